//! The eBPF programs: thin probes on KVM's MMU root lifecycle.
//!
//! Each program reads its arguments, reads kernel fields at the offsets the
//! tracer resolved from BTF (the global `OFFSETS`), fills one
//! `common::RootEvent` and submits it to the ring buffer `EVENTS`. Failures
//! are counted per CPU and per probe in `PROBE_COUNTERS`; nothing is dropped
//! silently. All reasoning about what the events mean happens in userspace.
//!
//! The `kvm_entry` gate is the exception that proves the rule: it runs on
//! every guest entry, so it keeps a per-CPU cache of the last vCPU and roots
//! it saw and leaves at once when nothing changed.
#![no_std]
#![no_main]
#![expect(
    clippy::inline_always,
    reason = "eBPF: inlining keeps each program one verifier-friendly function, with no BPF-to-BPF calls"
)]
#![expect(
    clippy::needless_pass_by_value,
    reason = "aya's program macros hand the context over by value"
)]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, kprobe, kretprobe, map, raw_tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, ProbeContext, RawTracePointContext, RetProbeContext},
};
use aya_log_ebpf::warn;
use common::{
    ENTRY_REVALIDATE_HITS, EntryState, EventKind, INVALID_PAGE, KVM_RUN, KVM_X86_TDX_VM,
    KernelOffsets, NR_IOCTL, OFFSET_ABSENT, PendingCall, ProbeConfig, ProbeCounters, ProbeId,
    RootEvent, SeenRoots, VCPU_FILE_NAME, entry_way, field,
};

/// Field offsets, set by the tracer from BTF before the object is loaded.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets::ABSENT;

/// Run-time switches, set by the tracer before the object is loaded.
#[unsafe(no_mangle)]
static PROBE_CONFIG: ProbeConfig = ProbeConfig {
    entry_transitions: 1,
    alloc_root_mirror_arg: 0,
    wakeup_bytes: 0,
};

/// The one event stream. The tracer sizes it at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
static PROBE_COUNTERS: PerCpuArray<ProbeCounters> =
    PerCpuArray::with_max_entries(ProbeId::COUNT, 0);

/// The `kvm_entry` gate's fast-path cache and counters, per CPU.
#[map]
static ENTRY_STATE: PerCpuArray<EntryState> = PerCpuArray::with_max_entries(1, 0);

/// The last roots each vCPU entered with, keyed by `struct kvm_vcpu *`.
#[map]
static VCPU_ROOTS: LruHashMap<u64, SeenRoots> = LruHashMap::with_max_entries(16384, 0);

/// Entry state waiting for its return probe, keyed by probe id and thread id.
#[map]
static PENDING_CALLS: LruHashMap<u64, PendingCall> = LruHashMap::with_max_entries(8192, 0);

#[inline(always)]
fn offsets() -> KernelOffsets {
    // SAFETY: OFFSETS is a valid static; the volatile read stops the compiler
    // from folding the placeholder value the tracer overwrites at load time.
    unsafe { core::ptr::read_volatile(&raw const OFFSETS) }
}

/// One field of `OFFSETS`, without copying the whole struct: the
/// `kvm_entry` hot path reads only what it uses.
macro_rules! offset {
    ($field:ident) => {
        // SAFETY: as for `offsets`.
        unsafe { core::ptr::read_volatile(&raw const OFFSETS.$field) }
    };
}

#[inline(always)]
fn config() -> ProbeConfig {
    // SAFETY: as for `offsets`.
    unsafe { core::ptr::read_volatile(&raw const PROBE_CONFIG) }
}

#[inline(always)]
fn counters(probe: ProbeId) -> Option<&'static mut ProbeCounters> {
    // SAFETY: the pointer comes from the per-CPU array lookup, is valid for
    // the program's run, and only this CPU touches this slot while the
    // program runs (BPF programs run with migration disabled).
    PROBE_COUNTERS
        .get_ptr_mut(probe as u32)
        .map(|p| unsafe { &mut *p })
}

/// Reads a `T` at `base + off` in kernel memory. `None` when the pointer is
/// null, the offset is absent, or the read faults.
#[inline(always)]
fn read_at<T>(base: u64, off: u32) -> Option<T> {
    if base == 0 || off == OFFSET_ABSENT {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copies with fault handling; a bad address
    // yields an error, never undefined behaviour in the program.
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T).ok() }
}

/// Tracks reads that were attempted (offset present) and failed.
struct Reader {
    failed: bool,
}

impl Reader {
    #[inline(always)]
    fn read<T>(&mut self, base: u64, off: u32) -> Option<T> {
        if base == 0 || off == OFFSET_ABSENT {
            return None;
        }
        let v = read_at(base, off);
        if v.is_none() {
            self.failed = true;
        }
        v
    }
}

/// The `struct kvm_mmu *` of a vCPU.
#[inline(always)]
fn vcpu_mmu(r: &mut Reader, off: &KernelOffsets, vcpu: u64) -> u64 {
    r.read::<u64>(vcpu, off.vcpu_arch_mmu).unwrap_or(0)
}

#[inline(always)]
fn fill_kvm(ev: &mut RootEvent, r: &mut Reader, off: &KernelOffsets, kvm: u64) {
    if kvm == 0 {
        return;
    }
    ev.kvm = kvm;
    ev.valid |= field::KVM;
    if let Some(v) = r.read::<u8>(kvm, off.kvm_vm_type) {
        ev.vm_type = v;
        ev.valid |= field::VM_TYPE;
    }
    if let Some(v) = r.read::<u8>(kvm, off.kvm_mmu_valid_gen) {
        ev.mmu_valid_gen = v;
        ev.valid |= field::MMU_VALID_GEN;
    }
    if let Some(v) = r.read::<i32>(kvm, off.kvm_userspace_pid) {
        ev.userspace_pid = v;
        ev.valid |= field::USERSPACE_PID;
    }
    if let Some(slots) = r.read::<u64>(kvm, off.kvm_memslots0)
        && let Some(v) = r.read::<u64>(slots, off.memslots_generation)
    {
        ev.memslots_gen = v;
        ev.valid |= field::MEMSLOTS_GEN;
    }
}

#[inline(always)]
fn fill_mmu(ev: &mut RootEvent, r: &mut Reader, off: &KernelOffsets, mmu: u64) {
    if let Some(v) = r.read::<u64>(mmu, off.mmu_root_hpa) {
        ev.root_hpa = v;
        ev.valid |= field::ROOT_HPA;
    }
    if let Some(v) = r.read::<u64>(mmu, off.mmu_root_pgd) {
        ev.root_pgd = v;
        ev.valid |= field::ROOT_PGD;
    }
    if let Some(v) = r.read::<u64>(mmu, off.mmu_mirror_root_hpa) {
        ev.mirror_root_hpa = v;
        ev.valid |= field::MIRROR_ROOT_HPA;
    }
    if let Some(v) = r.read::<u32>(mmu, off.mmu_root_role) {
        ev.root_role = v;
        ev.valid |= field::ROOT_ROLE;
    }
}

#[inline(always)]
fn fill_vcpu(ev: &mut RootEvent, r: &mut Reader, off: &KernelOffsets, vcpu: u64) {
    if vcpu == 0 {
        return;
    }
    ev.vcpu = vcpu;
    ev.valid |= field::VCPU;
    if let Some(v) = r.read::<i32>(vcpu, off.vcpu_vcpu_id) {
        ev.vcpu_id = v;
        ev.valid |= field::VCPU_ID;
    }
    let mmu = vcpu_mmu(r, off, vcpu);
    fill_mmu(ev, r, off, mmu);
    let kvm = r.read::<u64>(vcpu, off.vcpu_kvm).unwrap_or(0);
    fill_kvm(ev, r, off, kvm);
    let both = field::VM_TYPE | field::MIRROR_ROOT_HPA;
    if ev.valid & both == both
        && ev.vm_type == KVM_X86_TDX_VM
        && ev.mirror_root_hpa != INVALID_PAGE
        && off.can_read_root_role()
    {
        let role = read_at::<u64>(off.vmemmap_base_addr, 0).and_then(|vmemmap| {
            root_role(
                vmemmap,
                ev.mirror_root_hpa,
                off.page_size,
                off.page_private,
                off.mmu_page_role,
            )
        });
        if let Some(role) = role {
            ev.mirror_role = role;
            ev.valid |= field::MIRROR_ROLE;
            if (role >> off.role_invalid_bit) & 1 != 0 {
                ev.valid |= field::MIRROR_STALE;
            }
        } else {
            r.failed = true;
        }
    }
}

/// The role word of the shadow page a root points at: hpa → `struct page`
/// (through `vmemmap_base`) → `page.private` (the `struct kvm_mmu_page *`)
/// → `role`. `None` when any read fails.
#[inline(always)]
fn root_role(vmemmap: u64, hpa: u64, page_size: u32, private: u32, role: u32) -> Option<u32> {
    let page = vmemmap.wrapping_add((hpa >> 12).wrapping_mul(u64::from(page_size)));
    let sp = read_at::<u64>(page, private)?;
    read_at::<u32>(sp, role)
}

/// Reserves, fills and submits one event. `fill` sets the probe-specific
/// fields; the common header is set here. False when the ring buffer had no
/// room (counted).
#[inline(always)]
fn emit(probe: ProbeId, kind: EventKind, fill: impl FnOnce(&mut RootEvent, &mut Reader)) -> bool {
    let counters = counters(probe);
    let Some(mut entry) = EVENTS.reserve::<RootEvent>(0) else {
        if let Some(c) = counters {
            c.reserve_failed += 1;
        }
        return false;
    };
    // The event is filled in place, in the reserved slot: no 152-byte copy
    // on the stack (the kvm_entry gate must fit older verifiers' 512-byte
    // combined stack limit).
    let slot = entry.as_mut_ptr();
    // SAFETY: the reserved slot holds a RootEvent and is ours alone until it
    // is submitted; zeroing it first initialises every field and padding.
    let ev = unsafe {
        core::ptr::write_bytes(slot, 0, 1);
        &mut *slot
    };
    // SAFETY: helpers without preconditions.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as above.
    ev.cpu = unsafe { bpf_get_smp_processor_id() };
    let id = bpf_get_current_pid_tgid();
    ev.pid = (id >> 32) as u32;
    ev.tid = id as u32;
    ev.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    ev.kind = kind as u32;
    ev.probe = probe as u32;
    let mut reader = Reader { failed: false };
    fill(ev, &mut reader);
    entry.submit(wakeup_flags(kind));
    if let Some(c) = counters {
        c.emitted += 1;
        if reader.failed {
            c.read_failed += 1;
        }
    }
    true
}

/// Batches reader wakeups: below `wakeup_bytes` of waiting data the reader
/// is not woken (it drains on its timer); at or above, it is woken at once.
/// The forbidden TDX state always wakes it.
#[inline(always)]
fn wakeup_flags(kind: EventKind) -> u64 {
    let batch = u64::from(config().wakeup_bytes);
    if batch == 0 {
        0
    } else if matches!(kind, EventKind::EntryForbidden)
        || EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) + size_of::<RootEvent>() as u64 >= batch
    {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

#[inline(always)]
fn hit(probe: ProbeId) {
    if let Some(c) = counters(probe) {
        c.hits += 1;
    }
}

#[inline(always)]
fn pending_key(probe: ProbeId) -> u64 {
    (u64::from(probe as u32) << 32) | (bpf_get_current_pid_tgid() & 0xffff_ffff)
}

/// Saves entry state for the return probe of `probe`.
#[inline(always)]
fn stash(probe: ProbeId, call: &PendingCall) {
    // An LRU map never fails for lack of room; a failure here means the
    // return probe will count the call as unpaired.
    let _ = PENDING_CALLS.insert(pending_key(probe), call, 0);
}

/// Takes the entry state saved by [`stash`], counting a miss as unpaired.
#[inline(always)]
fn unstash(entry_probe: ProbeId, ret_probe: ProbeId) -> Option<PendingCall> {
    let key = pending_key(entry_probe);
    // SAFETY: the value is copied out before the entry is removed.
    let call = unsafe { PENDING_CALLS.get(key) }.copied();
    if call.is_some() {
        let _ = PENDING_CALLS.remove(key);
    } else if let Some(c) = counters(ret_probe) {
        c.unpaired += 1;
    }
    call
}

// ---------------------------------------------------------------------------
// kvm_mmu_load(vcpu): entry and return.

#[kprobe]
pub fn kvm_mmu_load(ctx: ProbeContext) -> u32 {
    hit(ProbeId::MmuLoad);
    let Some(vcpu) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let off = offsets();
    let mut r = Reader { failed: false };
    let mmu = vcpu_mmu(&mut r, &off, vcpu);
    let before = read_at::<u64>(mmu, off.mmu_root_hpa);
    stash(
        ProbeId::MmuLoad,
        &PendingCall {
            vcpu,
            // SAFETY: helper without preconditions.
            ts_ns: unsafe { bpf_ktime_get_ns() },
            arg: 0,
            before_hpa: before.unwrap_or(0),
            valid: if before.is_some() {
                field::BEFORE_HPA
            } else {
                0
            },
            _pad: 0,
        },
    );
    let _ = emit(ProbeId::MmuLoad, EventKind::LoadEnter, |ev, r| {
        fill_vcpu(ev, r, &off, vcpu);
    });
    0
}

#[kretprobe]
pub fn kvm_mmu_load_ret(ctx: RetProbeContext) -> u32 {
    hit(ProbeId::MmuLoadRet);
    let ret = i64::from(ctx.ret::<i32>());
    let Some(call) = unstash(ProbeId::MmuLoad, ProbeId::MmuLoadRet) else {
        return 0;
    };
    let off = offsets();
    let _ = emit(ProbeId::MmuLoadRet, EventKind::LoadReturn, |ev, r| {
        fill_vcpu(ev, r, &off, call.vcpu);
        ev.ret = ret;
        ev.before_hpa = call.before_hpa;
        ev.duration_ns = ev.ts_ns.wrapping_sub(call.ts_ns);
        ev.valid |= field::RET | field::DURATION | call.valid;
    });
    0
}

// ---------------------------------------------------------------------------
// Root allocation: mmu_alloc_direct_roots(vcpu) where it is a symbol, else
// kvm_tdp_mmu_alloc_root(vcpu, mirror) entry and return.

#[kprobe]
pub fn mmu_alloc_direct_roots(ctx: ProbeContext) -> u32 {
    hit(ProbeId::MmuAllocDirectRoots);
    let Some(vcpu) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let off = offsets();
    let _ = emit(
        ProbeId::MmuAllocDirectRoots,
        EventKind::AllocDirectRoots,
        |ev, r| fill_vcpu(ev, r, &off, vcpu),
    );
    0
}

#[kprobe]
pub fn kvm_tdp_mmu_alloc_root(ctx: ProbeContext) -> u32 {
    hit(ProbeId::TdpMmuAllocRoot);
    let Some(vcpu) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let mirror = if config().alloc_root_mirror_arg != 0 {
        ctx.arg::<u64>(1).unwrap_or(0) & 0xff
    } else {
        0
    };
    let off = offsets();
    let mut r = Reader { failed: false };
    let mmu = vcpu_mmu(&mut r, &off, vcpu);
    let target = if mirror != 0 {
        off.mmu_mirror_root_hpa
    } else {
        off.mmu_root_hpa
    };
    let before = read_at::<u64>(mmu, target);
    stash(
        ProbeId::TdpMmuAllocRoot,
        &PendingCall {
            vcpu,
            // SAFETY: helper without preconditions.
            ts_ns: unsafe { bpf_ktime_get_ns() },
            arg: mirror,
            before_hpa: before.unwrap_or(0),
            valid: if before.is_some() {
                field::BEFORE_HPA
            } else {
                0
            },
            _pad: 0,
        },
    );
    0
}

#[kretprobe]
pub fn kvm_tdp_mmu_alloc_root_ret(_ctx: RetProbeContext) -> u32 {
    hit(ProbeId::TdpMmuAllocRootRet);
    // kvm_tdp_mmu_alloc_root() returns void (6.14 on): rax holds nothing.
    let Some(call) = unstash(ProbeId::TdpMmuAllocRoot, ProbeId::TdpMmuAllocRootRet) else {
        return 0;
    };
    let off = offsets();
    let _ = emit(
        ProbeId::TdpMmuAllocRootRet,
        EventKind::AllocRoot,
        |ev, r| {
            fill_vcpu(ev, r, &off, call.vcpu);
            ev.arg = call.arg;
            ev.before_hpa = call.before_hpa;
            ev.duration_ns = ev.ts_ns.wrapping_sub(call.ts_ns);
            ev.valid |= field::ARG | field::DURATION | call.valid;
        },
    );
    0
}

// ---------------------------------------------------------------------------
// kvm_mmu_zap_all_fast(kvm): kprobe, or the raw tracepoint of the same name.

#[kprobe]
pub fn kvm_mmu_zap_all_fast(ctx: ProbeContext) -> u32 {
    hit(ProbeId::ZapAllFastKprobe);
    let Some(kvm) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let off = offsets();
    let _ = emit(ProbeId::ZapAllFastKprobe, EventKind::ZapAllFast, |ev, r| {
        fill_kvm(ev, r, &off, kvm);
    });
    0
}

#[raw_tracepoint(tracepoint = "kvm_mmu_zap_all_fast")]
pub fn kvm_mmu_zap_all_fast_tp(ctx: RawTracePointContext) -> u32 {
    hit(ProbeId::ZapAllFastTracepoint);
    let kvm = ctx.arg::<u64>(0);
    let off = offsets();
    let _ = emit(
        ProbeId::ZapAllFastTracepoint,
        EventKind::ZapAllFast,
        |ev, r| fill_kvm(ev, r, &off, kvm),
    );
    0
}

// ---------------------------------------------------------------------------
// kvm_tdp_mmu_invalidate_roots(kvm, root_types).

#[kprobe]
pub fn kvm_tdp_mmu_invalidate_roots(ctx: ProbeContext) -> u32 {
    hit(ProbeId::InvalidateRoots);
    let Some(kvm) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let root_types = ctx.arg::<u64>(1).unwrap_or(0) & 0xffff_ffff;
    let off = offsets();
    let _ = emit(
        ProbeId::InvalidateRoots,
        EventKind::InvalidateRoots,
        |ev, r| {
            fill_kvm(ev, r, &off, kvm);
            ev.arg = root_types;
            ev.valid |= field::ARG;
        },
    );
    0
}

// ---------------------------------------------------------------------------
// kvm_entry(vcpu, force_immediate_exit): the mirror-root invariant gate.

/// Bytes read from `vcpu->arch.mmu` on: the pointer, then (where BTF says
/// `root_mmu` follows it) the start of `root_mmu` up to its mirror root.
const ENTRY_READ: usize = 12;

/// The roots a vCPU is about to enter with, in as few reads as the layout
/// allows: one read covering `arch.mmu` and the embedded `arch.root_mmu`
/// when `arch.mmu` points there (every vCPU outside a nested guest), else a
/// read of the pointer and one of the roots. `None` when a read fails: an
/// unknown root is never taken for `INVALID_PAGE`.
#[inline(always)]
fn entry_roots(vcpu: u64) -> Option<(u64, u64)> {
    let (arch_mmu, root_mmu) = (offset!(vcpu_arch_mmu), offset!(vcpu_arch_root_mmu));
    let (root_hpa, mirror_hpa) = (offset!(mmu_root_hpa), offset!(mmu_mirror_root_hpa));
    let adjacent = mirror_hpa != OFFSET_ABSENT && mirror_hpa == root_hpa + 8;
    if adjacent
        && root_mmu != OFFSET_ABSENT
        && root_mmu == arch_mmu + 8
        && let Some(words) = read_at::<[u64; ENTRY_READ]>(vcpu, arch_mmu)
    {
        let i = (8 + root_hpa as usize) / 8;
        if words[0] == vcpu + u64::from(root_mmu)
            && let (Some(&root), Some(&mirror)) = (words.get(i), words.get(i + 1))
        {
            return Some((root, mirror));
        }
        return read_roots(words[0], root_hpa, mirror_hpa, adjacent);
    }
    let mmu = read_at::<u64>(vcpu, arch_mmu)?;
    read_roots(mmu, root_hpa, mirror_hpa, adjacent)
}

/// `root.hpa` and `mirror_root_hpa` of one `struct kvm_mmu`. A kernel
/// without mirror roots reads as `INVALID_PAGE` for the mirror (there is
/// none); a failed read is `None`.
#[inline(always)]
fn read_roots(mmu: u64, root_hpa: u32, mirror_hpa: u32, adjacent: bool) -> Option<(u64, u64)> {
    if adjacent {
        read_at::<[u64; 2]>(mmu, root_hpa).map(|r| (r[0], r[1]))
    } else {
        let root = read_at::<u64>(mmu, root_hpa)?;
        let mirror = if mirror_hpa == OFFSET_ABSENT {
            INVALID_PAGE
        } else {
            read_at::<u64>(mmu, mirror_hpa)?
        };
        Some((root, mirror))
    }
}

/// After a report could not be reserved, the gate retries at most this
/// often per CPU.
const RETRY_NS: u64 = 1_000_000;

#[raw_tracepoint(tracepoint = "kvm_entry")]
pub fn kvm_entry_gate(ctx: RawTracePointContext) -> u32 {
    let vcpu = ctx.arg::<u64>(0);
    // The pointer is a plain number here: it picks the cache way itself.
    gate(
        &ctx,
        vcpu,
        entry_roots,
        |_| vcpu,
        |vcpu| {
            read_at::<u64>(vcpu, offset!(vcpu_kvm))
                .and_then(|kvm| read_at::<u8>(kvm, offset!(kvm_vm_type)))
        },
    )
}

/// The same gate as a BTF-enabled tracepoint (`tp_btf`): the verifier knows
/// `vcpu`'s type, so the roots and the VM type are plain loads checked
/// against BTF, not `bpf_probe_read_kernel` calls. Loaded by the tracer
/// itself where the kernel allows tracing programs (`loader::btf_tp`).
#[btf_tracepoint(function = "kvm_entry")]
pub fn kvm_entry_gate_btf(ctx: BtfTracePointContext) -> u32 {
    let vcpu = ctx.arg::<u64>(0);
    // The verifier allows no arithmetic but + and - on a typed pointer, so
    // the cache way comes from numbers: the vCPU's id tells a VM's vCPUs
    // apart (they share roots), the root tells VMs apart.
    let way_key =
        |root: u64| root ^ u64::from(btf_load::<u32>(vcpu, offset!(vcpu_vcpu_id)).unwrap_or(0));
    gate(&ctx, vcpu, btf_roots, way_key, |vcpu| {
        let kvm = btf_load::<u64>(vcpu, offset!(vcpu_kvm))?;
        btf_load::<u8>(kvm, offset!(kvm_vm_type))
    })
}

/// A load from a BTF-typed kernel pointer (`tp_btf` only): the verifier
/// checks `base + off` against the type and turns the load into one that
/// can't fault (a bad address reads 0). `None` for a null base or an
/// absent offset.
#[inline(always)]
fn btf_load<T: Copy>(base: u64, off: u32) -> Option<T> {
    if base == 0 || off == OFFSET_ABSENT {
        return None;
    }
    // SAFETY: in a tp_btf program `base` is a pointer the verifier typed from
    // BTF and `off` a constant from the frozen `.rodata` (resolved from the
    // same BTF); the verifier rejects a load outside the type's fields, and
    // rewrites the accepted one into a fault-handled load.
    Some(unsafe { core::ptr::read_volatile((base + u64::from(off)) as *const T) })
}

/// `root.hpa` and `mirror_root_hpa` through `vcpu->arch.mmu`, as BTF loads.
#[inline(always)]
fn btf_roots(vcpu: u64) -> Option<(u64, u64)> {
    let mmu = btf_load::<u64>(vcpu, offset!(vcpu_arch_mmu)).filter(|&m| m != 0)?;
    let root = btf_load::<u64>(mmu, offset!(mmu_root_hpa))?;
    let mirror = match offset!(mmu_mirror_root_hpa) {
        OFFSET_ABSENT => INVALID_PAGE,
        off => btf_load::<u64>(mmu, off)?,
    };
    Some((root, mirror))
}

/// The cached VM type when `vcpu` enters again with the roots its cache way
/// holds, and the way is not due for a full read; counts the hit.
#[inline(always)]
fn cache_hit(way: &mut SeenRoots, vcpu: u64, root: u64, mirror: u64) -> Option<u8> {
    let hit = way.vcpu == vcpu
        && way.root_hpa == root
        && way.mirror_root_hpa == mirror
        && way.hits < ENTRY_REVALIDATE_HITS;
    if hit {
        way.hits += 1;
        Some(way.vm_type)
    } else {
        None
    }
}

/// The gate, whichever way it reads the vCPU: `roots` reads the roots it is
/// about to enter with, `way_key` makes the number that picks its cache way
/// from the root, `vm_type` reads its VM's type (only on a cache miss).
#[inline(always)]
fn gate<C: EbpfContext>(
    ctx: &C,
    vcpu: u64,
    roots: impl FnOnce(u64) -> Option<(u64, u64)>,
    way_key: impl FnOnce(u64) -> u64,
    vm_type: impl FnOnce(u64) -> Option<u8>,
) -> u32 {
    let Some(state) = ENTRY_STATE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: a per-CPU array slot, valid for the program's run and only used
    // by this CPU while it runs.
    let state = unsafe { &mut *state };
    state.counters.entries += 1;
    let Some((root, mirror)) = roots(vcpu) else {
        state.counters.read_failed += 1;
        return 0;
    };

    let slot = entry_way(way_key(root));
    let cached = cache_hit(&mut state.cache[slot], vcpu, root, mirror);
    let fast = cached.is_some();
    let vm_type = if let Some(t) = cached {
        t
    } else {
        state.counters.slow_path += 1;
        let Some(t) = vm_type(vcpu) else {
            state.counters.read_failed += 1;
            return 0;
        };
        t
    };
    let tdx = vm_type == KVM_X86_TDX_VM;
    // Only TDX vCPUs with a mirror root pay for following it to its page:
    // invalidation sets role.invalid there and never rewrites the hpa, so
    // the cache can't see it.
    let stale_bit = if tdx && mirror != INVALID_PAGE {
        let Some(s) = mirror_stale(state, mirror) else {
            state.counters.read_failed += 1;
            return 0;
        };
        u8::from(s)
    } else {
        0
    };
    let forbidden = tdx && root != INVALID_PAGE && (mirror == INVALID_PAGE || stale_bit != 0);
    if tdx {
        state.counters.tdx_entries += 1;
    }
    if forbidden {
        state.counters.forbidden_entries += 1;
        if stale_bit != 0 {
            state.counters.stale_entries += 1;
        }
    }
    if fast && state.cache[slot].stale == stale_bit {
        return 0;
    }

    let seen = SeenRoots {
        vcpu,
        root_hpa: root,
        mirror_root_hpa: mirror,
        vm_type,
        stale: stale_bit,
        hits: 0,
        _pad: [0; 4],
    };
    // A vCPU that moved to this CPU with roots it already entered with is
    // not news.
    // SAFETY: the value is copied out at once.
    let known = unsafe { VCPU_ROOTS.get(vcpu) }.copied();
    // A vCPU whose VM type reads differently is news too: a new VM at a
    // reused address (or a fault injected into kernel memory).
    let news = !known.is_some_and(|k| {
        k.root_hpa == root
            && k.mirror_root_hpa == mirror
            && k.stale == stale_bit
            && k.vm_type == vm_type
    });
    if news && (forbidden || config().entry_transitions != 0) {
        // The state is cached only once its event is reserved: a forbidden
        // state the ring buffer had no room for is reported again at a
        // later entry (at most once per RETRY_NS on this CPU), never lost
        // behind the cache.
        // SAFETY: helper without preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        if now < state.retry_after_ns {
            return 0;
        }
        hit(ProbeId::KvmEntry);
        let kind = if forbidden {
            EventKind::EntryForbidden
        } else {
            EventKind::EntryTransition
        };
        if forbidden {
            warn!(
                ctx,
                "TDX vCPU entered with root.hpa {:x}, mirror_root_hpa {:x} (stale {})",
                root,
                mirror,
                stale_bit
            );
        }
        if !emit(ProbeId::KvmEntry, kind, |ev, r| {
            fill_vcpu(ev, r, &offsets(), vcpu);
        }) {
            state.counters.retries += 1;
            state.retry_after_ns = now + RETRY_NS;
            return 0;
        }
    }
    state.cache[slot] = seen;
    if news {
        let _ = VCPU_ROOTS.insert(vcpu, seen, 0);
    }
    0
}

/// Whether the mirror root's page has `role.invalid` set. `Some(false)` when
/// the kernel's layout is unknown (the check is off); `None` when a read
/// fails.
#[inline(always)]
fn mirror_stale(state: &mut EntryState, mirror: u64) -> Option<bool> {
    let (page_size, private, role, bit) = (
        offset!(page_size),
        offset!(page_private),
        offset!(mmu_page_role),
        offset!(role_invalid_bit),
    );
    let sym = offset!(vmemmap_base_addr);
    if sym == 0
        || page_size == OFFSET_ABSENT
        || private == OFFSET_ABSENT
        || role == OFFSET_ABSENT
        || bit >= 32
    {
        return Some(false);
    }
    if state.vmemmap_base == 0 {
        state.vmemmap_base = read_at::<u64>(sym, 0)?;
    }
    let word = root_role(state.vmemmap_base, mirror, page_size, private, role)?;
    Some((word >> bit) & 1 != 0)
}

// ---------------------------------------------------------------------------
// Teardown: kvm_mmu_destroy(vcpu) and kvm_arch_destroy_vm(kvm).

#[kprobe]
pub fn kvm_mmu_destroy(ctx: ProbeContext) -> u32 {
    hit(ProbeId::VcpuDestroy);
    let Some(vcpu) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let off = offsets();
    let _ = emit(ProbeId::VcpuDestroy, EventKind::VcpuDestroy, |ev, r| {
        fill_vcpu(ev, r, &off, vcpu);
    });
    0
}

#[kprobe]
pub fn kvm_arch_destroy_vm(ctx: ProbeContext) -> u32 {
    hit(ProbeId::VmDestroy);
    let Some(kvm) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let off = offsets();
    let _ = emit(ProbeId::VmDestroy, EventKind::VmDestroy, |ev, r| {
        fill_kvm(ev, r, &off, kvm);
    });
    0
}

// ---------------------------------------------------------------------------
// sys_exit of ioctl(KVM_RUN): the roots a vCPU ran with. The fallback where
// kprobes are unavailable, and the one observation point that works for
// every KVM backend (VMX, SVM, TDX, PVM), since it needs no KVM tracepoint.

/// The `struct kvm_vcpu *` behind file descriptor `fd` of the current task,
/// if that file is a vCPU (its anon-inode name starts with `kvm-vcpu`).
#[inline(always)]
fn vcpu_of_fd(off: &KernelOffsets, fd: u64) -> Option<u64> {
    // SAFETY: helper without preconditions; the result is only used as an
    // address for bpf_probe_read_kernel.
    let task = unsafe { aya_ebpf::helpers::generated::bpf_get_current_task() };
    let files = read_at::<u64>(task, off.task_files)?;
    let fdt = read_at::<u64>(files, off.files_fdt)?;
    let max = read_at::<u32>(fdt, off.fdtable_max_fds)?;
    if fd >= u64::from(max) {
        return None;
    }
    let fds = read_at::<u64>(fdt, off.fdtable_fd)?;
    let file = read_at::<u64>(fds + fd * 8, 0)?;
    let dentry = read_at::<u64>(file, off.file_dentry)?;
    let name_ptr = read_at::<u64>(dentry, off.dentry_name)?;
    let name = read_at::<[u8; 8]>(name_ptr, 0)?;
    if name != VCPU_FILE_NAME {
        return None;
    }
    read_at::<u64>(file, off.file_private_data)
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn kvm_run_exit(ctx: RawTracePointContext) -> u32 {
    let regs = ctx.arg::<u64>(0);
    let off = offsets();
    if read_at::<u64>(regs, off.regs_orig_ax) != Some(NR_IOCTL) {
        return 0;
    }
    if read_at::<u64>(regs, off.regs_si).map(|c| c & 0xffff_ffff) != Some(KVM_RUN) {
        return 0;
    }
    hit(ProbeId::KvmRunExit);
    let ret = ctx.arg::<i64>(1);
    let Some(fd) = read_at::<u64>(regs, off.regs_di) else {
        return 0;
    };
    let Some(vcpu) = vcpu_of_fd(&off, fd & 0xffff_ffff) else {
        if let Some(c) = counters(ProbeId::KvmRunExit) {
            c.read_failed += 1;
        }
        return 0;
    };
    let _ = emit(ProbeId::KvmRunExit, EventKind::RunExit, |ev, r| {
        fill_vcpu(ev, r, &off, vcpu);
        ev.ret = ret;
        ev.valid |= field::RET;
    });
    0
}

// ---------------------------------------------------------------------------
// Floors: empty programs, attached beside the real ones on the same hooks
// with `--baseline`, so the kernel's run-time stats give each hook's floor.

macro_rules! floor {
    ($($attr:ident $(($($arg:tt)*))? $name:ident($ctx:ty);)*) => {$(
        #[$attr $(($($arg)*))?]
        pub fn $name(_ctx: $ctx) -> u32 {
            0
        }
    )*};
}

floor! {
    kprobe floor_mmu_load(ProbeContext);
    kretprobe floor_mmu_load_ret(RetProbeContext);
    kprobe floor_alloc_direct(ProbeContext);
    kprobe floor_alloc_root(ProbeContext);
    kretprobe floor_alloc_root_ret(RetProbeContext);
    kprobe floor_zap_kprobe(ProbeContext);
    raw_tracepoint(tracepoint = "kvm_mmu_zap_all_fast") floor_zap_tp(RawTracePointContext);
    kprobe floor_invalidate(ProbeContext);
    raw_tracepoint(tracepoint = "kvm_entry") floor_kvm_entry(RawTracePointContext);
    btf_tracepoint(function = "kvm_entry") floor_kvm_entry_btf(BtfTracePointContext);
    raw_tracepoint(tracepoint = "sys_exit") floor_sys_exit(RawTracePointContext);
    kprobe floor_mmu_destroy(ProbeContext);
    kprobe floor_destroy_vm(ProbeContext);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
