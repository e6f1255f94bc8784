//! Types shared by the eBPF probes (`probe-ebpf`) and the userspace tracer.
//!
//! Everything here crosses the kernel/user boundary as raw bytes, so every
//! struct is `#[repr(C)]` with explicit padding and a size asserted at
//! compile time. Booleans are `u32`/`u8`, never `bool`. The `user` feature
//! adds `aya::Pod` so userspace can pass these as globals and map values.
#![no_std]

/// `INVALID_PAGE` in the kernel: `(hpa_t)~0ull`.
pub const INVALID_PAGE: u64 = u64::MAX;

/// `KVM_X86_TDX_VM`, the value of `kvm->arch.vm_type` for a TDX guest.
pub const KVM_X86_TDX_VM: u8 = 5;

/// An offset the kernel does not have (the field is absent from its BTF).
pub const OFFSET_ABSENT: u32 = u32::MAX;

/// Bytes of `task_struct::comm`.
pub const COMM_LEN: usize = 16;

/// Field offsets, resolved from BTF by the tracer and handed to the programs
/// as the global `OFFSETS`. A field set to [`OFFSET_ABSENT`] is not read.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct kvm_vcpu::kvm` (pointer).
    pub vcpu_kvm: u32,
    /// `struct kvm_vcpu::vcpu_id` (int).
    pub vcpu_vcpu_id: u32,
    /// `struct kvm_vcpu::arch.mmu` (pointer to `struct kvm_mmu`).
    pub vcpu_arch_mmu: u32,
    /// `struct kvm_mmu::root.hpa` (u64).
    pub mmu_root_hpa: u32,
    /// `struct kvm_mmu::root.pgd` (u64).
    pub mmu_root_pgd: u32,
    /// `struct kvm_mmu::mirror_root_hpa` (u64, since 6.14).
    pub mmu_mirror_root_hpa: u32,
    /// `struct kvm_mmu::root_role` (u32 union word).
    pub mmu_root_role: u32,
    /// `struct kvm::arch.vm_type` (u8).
    pub kvm_vm_type: u32,
    /// `struct kvm::arch.mmu_valid_gen` (u8).
    pub kvm_mmu_valid_gen: u32,
    /// `struct kvm::userspace_pid` (`pid_t`).
    pub kvm_userspace_pid: u32,
    /// `struct kvm::memslots[0]` (pointer to `struct kvm_memslots`).
    pub kvm_memslots0: u32,
    /// `struct kvm_memslots::generation` (u64).
    pub memslots_generation: u32,
    /// `struct pt_regs::orig_ax` (syscall number at syscall exit).
    pub regs_orig_ax: u32,
    /// `struct pt_regs::di` (first syscall argument).
    pub regs_di: u32,
    /// `struct pt_regs::si` (second syscall argument).
    pub regs_si: u32,
    /// `struct task_struct::files`.
    pub task_files: u32,
    /// `struct files_struct::fdt`.
    pub files_fdt: u32,
    /// `struct fdtable::max_fds`.
    pub fdtable_max_fds: u32,
    /// `struct fdtable::fd`.
    pub fdtable_fd: u32,
    /// `struct file::private_data` (the `struct kvm_vcpu *` of a vCPU fd).
    pub file_private_data: u32,
    /// `struct file::f_path.dentry`.
    pub file_dentry: u32,
    /// `struct dentry::d_name.name`.
    pub dentry_name: u32,
    /// `struct kvm_vcpu::arch.root_mmu` (the embedded `struct kvm_mmu` that
    /// `arch.mmu` points to outside nested guests).
    pub vcpu_arch_root_mmu: u32,
    /// `sizeof(struct page)`: a root's `struct page` is at
    /// `vmemmap_base + (hpa >> 12) * page_size`.
    pub page_size: u32,
    /// `struct page::private` (a shadow page's `struct kvm_mmu_page *`).
    pub page_private: u32,
    /// `struct kvm_mmu_page::role` (u32 union word).
    pub mmu_page_role: u32,
    /// Bit of `role.invalid` in that word.
    pub role_invalid_bit: u32,
    pub _pad: u32,
    /// Address of the kernel variable `vmemmap_base` (0: unknown, and the
    /// stale-mirror-root check is off).
    pub vmemmap_base_addr: u64,
}

impl KernelOffsets {
    /// Every field absent: the programs read nothing but their arguments.
    pub const ABSENT: Self = Self {
        vcpu_kvm: OFFSET_ABSENT,
        vcpu_vcpu_id: OFFSET_ABSENT,
        vcpu_arch_mmu: OFFSET_ABSENT,
        mmu_root_hpa: OFFSET_ABSENT,
        mmu_root_pgd: OFFSET_ABSENT,
        mmu_mirror_root_hpa: OFFSET_ABSENT,
        mmu_root_role: OFFSET_ABSENT,
        kvm_vm_type: OFFSET_ABSENT,
        kvm_mmu_valid_gen: OFFSET_ABSENT,
        kvm_userspace_pid: OFFSET_ABSENT,
        kvm_memslots0: OFFSET_ABSENT,
        memslots_generation: OFFSET_ABSENT,
        regs_orig_ax: OFFSET_ABSENT,
        regs_di: OFFSET_ABSENT,
        regs_si: OFFSET_ABSENT,
        task_files: OFFSET_ABSENT,
        files_fdt: OFFSET_ABSENT,
        fdtable_max_fds: OFFSET_ABSENT,
        fdtable_fd: OFFSET_ABSENT,
        file_private_data: OFFSET_ABSENT,
        file_dentry: OFFSET_ABSENT,
        dentry_name: OFFSET_ABSENT,
        vcpu_arch_root_mmu: OFFSET_ABSENT,
        page_size: OFFSET_ABSENT,
        page_private: OFFSET_ABSENT,
        mmu_page_role: OFFSET_ABSENT,
        role_invalid_bit: OFFSET_ABSENT,
        _pad: 0,
        vmemmap_base_addr: 0,
    };

    /// Whether the probes can follow a mirror root to its page's role.
    pub const fn can_read_root_role(&self) -> bool {
        self.vmemmap_base_addr != 0
            && self.page_size != OFFSET_ABSENT
            && self.page_private != OFFSET_ABSENT
            && self.mmu_page_role != OFFSET_ABSENT
            && self.role_invalid_bit < 32
    }
}

const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 120);

/// Run-time switches for the programs, the global `PROBE_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Non-zero: the `kvm_entry` gate also reports the first entry of a vCPU
    /// with a root pair it has not entered with before (one event per root
    /// change, not per entry).
    pub entry_transitions: u32,
    /// Non-zero: `kvm_tdp_mmu_alloc_root` takes `(vcpu, bool mirror)` (BTF
    /// said so); otherwise it has no mirror argument and every root it
    /// allocates is a direct root.
    pub alloc_root_mirror_arg: u32,
    /// Ring-buffer wakeup batching: an event wakes the reader only once this
    /// many bytes are waiting (the reader also polls on a timer). 0 wakes
    /// the reader for every event. Forbidden-state events always wake it.
    pub wakeup_bytes: u32,
}

const _: () = assert!(core::mem::size_of::<ProbeConfig>() == 12);

/// Which probe produced an event, and the index of its counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProbeId {
    MmuLoad = 0,
    MmuLoadRet = 1,
    MmuAllocDirectRoots = 2,
    TdpMmuAllocRoot = 3,
    TdpMmuAllocRootRet = 4,
    ZapAllFastKprobe = 5,
    ZapAllFastTracepoint = 6,
    InvalidateRoots = 7,
    KvmEntry = 8,
    KvmRunExit = 9,
    VcpuDestroy = 10,
    VmDestroy = 11,
}

impl ProbeId {
    /// Number of probe ids, the size of the counter arrays.
    pub const COUNT: u32 = 12;

    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::MmuLoad,
        Self::MmuLoadRet,
        Self::MmuAllocDirectRoots,
        Self::TdpMmuAllocRoot,
        Self::TdpMmuAllocRootRet,
        Self::ZapAllFastKprobe,
        Self::ZapAllFastTracepoint,
        Self::InvalidateRoots,
        Self::KvmEntry,
        Self::KvmRunExit,
        Self::VcpuDestroy,
        Self::VmDestroy,
    ];

    pub const fn from_u32(v: u32) -> Option<Self> {
        if v < Self::COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    /// The name of the eBPF program in the object file.
    pub const fn program_name(self) -> &'static str {
        match self {
            Self::MmuLoad => "kvm_mmu_load",
            Self::MmuLoadRet => "kvm_mmu_load_ret",
            Self::MmuAllocDirectRoots => "mmu_alloc_direct_roots",
            Self::TdpMmuAllocRoot => "kvm_tdp_mmu_alloc_root",
            Self::TdpMmuAllocRootRet => "kvm_tdp_mmu_alloc_root_ret",
            Self::ZapAllFastKprobe => "kvm_mmu_zap_all_fast",
            Self::ZapAllFastTracepoint => "kvm_mmu_zap_all_fast_tp",
            Self::InvalidateRoots => "kvm_tdp_mmu_invalidate_roots",
            Self::KvmEntry => "kvm_entry_gate",
            Self::KvmRunExit => "kvm_run_exit",
            Self::VcpuDestroy => "kvm_mmu_destroy",
            Self::VmDestroy => "kvm_arch_destroy_vm",
        }
    }

    /// The empty program attached beside this one, on the same hook, when
    /// measuring cost (`--baseline`): the floor any program there pays.
    pub const fn floor_program_name(self) -> &'static str {
        match self {
            Self::MmuLoad => "floor_mmu_load",
            Self::MmuLoadRet => "floor_mmu_load_ret",
            Self::MmuAllocDirectRoots => "floor_alloc_direct",
            Self::TdpMmuAllocRoot => "floor_alloc_root",
            Self::TdpMmuAllocRootRet => "floor_alloc_root_ret",
            Self::ZapAllFastKprobe => "floor_zap_kprobe",
            Self::ZapAllFastTracepoint => "floor_zap_tp",
            Self::InvalidateRoots => "floor_invalidate",
            Self::KvmEntry => "floor_kvm_entry",
            Self::KvmRunExit => "floor_sys_exit",
            Self::VcpuDestroy => "floor_mmu_destroy",
            Self::VmDestroy => "floor_destroy_vm",
        }
    }
}

/// What an event reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// `kvm_mmu_load()` entered.
    LoadEnter = 1,
    /// `kvm_mmu_load()` returned; `ret` is its return code, `before_hpa` the
    /// `root.hpa` on entry.
    LoadReturn = 2,
    /// `mmu_alloc_direct_roots()` entered.
    AllocDirectRoots = 3,
    /// `kvm_tdp_mmu_alloc_root(vcpu, mirror)` returned; `arg` is `mirror`,
    /// `before_hpa` the value of that root on entry.
    AllocRoot = 4,
    /// `kvm_mmu_zap_all_fast(kvm)`.
    ZapAllFast = 5,
    /// `kvm_tdp_mmu_invalidate_roots(kvm, root_types)`; `arg` is `root_types`.
    InvalidateRoots = 6,
    /// A vCPU entered the guest with a root pair it had not entered with
    /// before.
    EntryTransition = 7,
    /// A TDX vCPU entered the guest with a valid `root.hpa` and an invalid
    /// `mirror_root_hpa`: the forbidden state.
    EntryForbidden = 8,
    /// `ioctl(KVM_RUN)` returned: the roots the vCPU ran with. The fallback
    /// observation point where kprobes are unavailable; `ret` is the
    /// syscall's return value.
    RunExit = 9,
    /// `kvm_mmu_destroy(vcpu)`: vCPU teardown; its mirror root is freed.
    VcpuDestroy = 10,
    /// `kvm_arch_destroy_vm(kvm)`: VM teardown.
    VmDestroy = 11,
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::LoadEnter,
            2 => Self::LoadReturn,
            3 => Self::AllocDirectRoots,
            4 => Self::AllocRoot,
            5 => Self::ZapAllFast,
            6 => Self::InvalidateRoots,
            7 => Self::EntryTransition,
            8 => Self::EntryForbidden,
            9 => Self::RunExit,
            10 => Self::VcpuDestroy,
            11 => Self::VmDestroy,
            _ => return None,
        })
    }
}

/// `ioctl` on x86-64.
pub const NR_IOCTL: u64 = 16;

/// `KVM_RUN`, `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u64 = 0xae80;

/// The anon-inode name prefix of vCPU file descriptors.
pub const VCPU_FILE_NAME: [u8; 8] = *b"kvm-vcpu";

/// Bits of [`RootEvent::valid`]: which fields the probe could read.
pub mod field {
    pub const KVM: u32 = 1 << 0;
    pub const VCPU: u32 = 1 << 1;
    pub const VCPU_ID: u32 = 1 << 2;
    pub const USERSPACE_PID: u32 = 1 << 3;
    pub const VM_TYPE: u32 = 1 << 4;
    pub const ROOT_HPA: u32 = 1 << 5;
    pub const ROOT_PGD: u32 = 1 << 6;
    pub const MIRROR_ROOT_HPA: u32 = 1 << 7;
    pub const ROOT_ROLE: u32 = 1 << 8;
    pub const MMU_VALID_GEN: u32 = 1 << 9;
    pub const MEMSLOTS_GEN: u32 = 1 << 10;
    pub const RET: u32 = 1 << 11;
    pub const ARG: u32 = 1 << 12;
    pub const BEFORE_HPA: u32 = 1 << 13;
    pub const DURATION: u32 = 1 << 14;
    pub const MIRROR_ROLE: u32 = 1 << 15;
    /// With `MIRROR_ROLE`: the role's `invalid` bit (at the position BTF
    /// gives: 11 up to 7.1, 12 from 7.2) is set, a stale mirror root.
    pub const MIRROR_STALE: u32 = 1 << 16;
}

/// One root-lifecycle event, as written to the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootEvent {
    /// `bpf_ktime_get_ns()`: `CLOCK_MONOTONIC` nanoseconds.
    pub ts_ns: u64,
    /// `struct kvm *`.
    pub kvm: u64,
    /// `struct kvm_vcpu *`.
    pub vcpu: u64,
    pub root_hpa: u64,
    pub root_pgd: u64,
    pub mirror_root_hpa: u64,
    /// `kvm->memslots[0]->generation`.
    pub memslots_gen: u64,
    /// Return value of the probed function (sign-extended).
    pub ret: i64,
    /// The interesting argument: `mirror` or `root_types`.
    pub arg: u64,
    /// The root value on entry, for return events.
    pub before_hpa: u64,
    /// Time since the paired entry probe, for return events.
    pub duration_ns: u64,
    /// [`EventKind`] as u32.
    pub kind: u32,
    /// [`ProbeId`] as u32.
    pub probe: u32,
    pub cpu: u32,
    /// Thread group id of the current task.
    pub pid: u32,
    /// Thread id of the current task.
    pub tid: u32,
    pub vcpu_id: i32,
    /// `kvm->userspace_pid`: the VMM process that created the VM.
    pub userspace_pid: i32,
    /// `kvm_mmu_page_role` word.
    pub root_role: u32,
    /// [`field`] bits: which of the fields above hold a value.
    pub valid: u32,
    /// `kvm_mmu_page_role` word of the page the mirror root points at (read
    /// through `vmemmap_base` for TDX vCPUs with a valid mirror root): its
    /// `invalid` bit says the root was invalidated under the vCPU.
    pub mirror_role: u32,
    pub vm_type: u8,
    pub mmu_valid_gen: u8,
    pub _pad: [u8; 6],
    pub comm: [u8; COMM_LEN],
}

impl RootEvent {
    pub const ZERO: Self = Self {
        ts_ns: 0,
        kvm: 0,
        vcpu: 0,
        root_hpa: 0,
        root_pgd: 0,
        mirror_root_hpa: 0,
        memslots_gen: 0,
        ret: 0,
        arg: 0,
        before_hpa: 0,
        duration_ns: 0,
        kind: 0,
        probe: 0,
        cpu: 0,
        pid: 0,
        tid: 0,
        vcpu_id: 0,
        userspace_pid: 0,
        root_role: 0,
        valid: 0,
        mirror_role: 0,
        vm_type: 0,
        mmu_valid_gen: 0,
        _pad: [0; 6],
        comm: [0; COMM_LEN],
    };
}

const _: () = assert!(core::mem::size_of::<RootEvent>() == 152);
const _: () = assert!(core::mem::align_of::<RootEvent>() == 8);

/// Per-CPU, per-probe counters (the map `PROBE_COUNTERS`, indexed by
/// [`ProbeId`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeCounters {
    /// Times the program ran.
    pub hits: u64,
    /// Events submitted to the ring buffer.
    pub emitted: u64,
    /// Events lost because the ring buffer was full.
    pub reserve_failed: u64,
    /// Events with at least one field that could not be read.
    pub read_failed: u64,
    /// Return probes with no matching entry (lost pairing).
    pub unpaired: u64,
}

const _: () = assert!(core::mem::size_of::<ProbeCounters>() == 40);

/// Per-CPU counters of the `kvm_entry` gate (in the map `ENTRY_STATE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryCounters {
    /// Guest entries seen.
    pub entries: u64,
    /// Entries of TDX vCPUs.
    pub tdx_entries: u64,
    /// Entries in the forbidden state (valid root, invalid mirror, TDX).
    pub forbidden_entries: u64,
    /// Entries that left the per-CPU fast path (new vCPU or new roots).
    pub slow_path: u64,
    /// Entries whose roots (or VM type) could not be read: not judged.
    pub read_failed: u64,
    /// Entries in the stale state (TDX, valid root, mirror root whose page
    /// has `role.invalid` set).
    pub stale_entries: u64,
    /// Events the gate had to report but could not reserve (ring buffer
    /// full): the state is not cached, so it is retried (rate-limited).
    pub retries: u64,
}

const _: () = assert!(core::mem::size_of::<EntryCounters>() == 56);

/// Last root pair a vCPU entered with (the map `VCPU_ROOTS`, and the per-CPU
/// fast-path cache).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeenRoots {
    pub vcpu: u64,
    pub root_hpa: u64,
    pub mirror_root_hpa: u64,
    pub vm_type: u8,
    /// 1: the mirror root's page had `role.invalid` set.
    pub stale: u8,
    /// Fast-path hits since the entry was filled (the gate's cache only).
    pub hits: u16,
    pub _pad: [u8; 4],
}

/// The gate's cache reads a vCPU again in full after this many fast-path
/// hits, so what the fast path doesn't compare (the VM type) can't stay
/// stale behind it: a changed value is seen within this many entries of
/// that vCPU.
pub const ENTRY_REVALIDATE_HITS: u16 = 1024;

const _: () = assert!(core::mem::size_of::<SeenRoots>() == 32);

/// Ways of the `kvm_entry` gate's per-CPU cache: a power of two.
pub const ENTRY_CACHE_WAYS: usize = 4;

/// The way of the gate's per-CPU cache for `key` (a number that tells
/// vCPUs apart: the raw-tracepoint gate uses the `struct kvm_vcpu *`):
/// the top bits of a multiplicative hash, so vCPUs that take turns on one
/// CPU (overcommitted hosts) mostly keep their own way and stay on the
/// fast path.
#[inline]
#[must_use]
pub const fn entry_way(key: u64) -> usize {
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - ENTRY_CACHE_WAYS.trailing_zeros())) as usize
        & (ENTRY_CACHE_WAYS - 1)
}

/// The `kvm_entry` gate's per-CPU state (the map `ENTRY_STATE`): its
/// fast-path cache and its counters, in one slot so a guest entry costs one
/// map lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryState {
    /// The last vCPUs and roots that entered the guest on this CPU, one per
    /// way: a vCPU's way is a hash of its pointer.
    pub cache: [SeenRoots; ENTRY_CACHE_WAYS],
    pub counters: EntryCounters,
    /// No retry of a failed report before this `bpf_ktime_get_ns()`.
    pub retry_after_ns: u64,
    /// The value of `vmemmap_base`, read once per CPU (0: not yet).
    pub vmemmap_base: u64,
}

const _: () = assert!(core::mem::size_of::<EntryState>() == 200);
const _: () = assert!(ENTRY_CACHE_WAYS.is_power_of_two());

/// State kept between an entry probe and its return probe (the map
/// `PENDING_CALLS`, keyed by probe id and thread id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingCall {
    pub vcpu: u64,
    pub ts_ns: u64,
    pub arg: u64,
    pub before_hpa: u64,
    pub valid: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<PendingCall>() == 40);

#[cfg(feature = "user")]
mod user {
    use super::{
        EntryCounters, EntryState, KernelOffsets, PendingCall, ProbeConfig, ProbeCounters,
        RootEvent, SeenRoots,
    };

    // SAFETY: all of these are #[repr(C)] plain integers and byte arrays with
    // explicit padding fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ProbeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RootEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EntryState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ProbeCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EntryCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SeenRoots {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PendingCall {}
}
