//! A tiny real KVM guest for tests and benches: vCPUs that run one `hlt`,
//! and a second memslot to delete and re-add (each deletion of a memslot
//! in a default VM fires `kvm_mmu_zap_all_fast`).

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

const MEM_SIZE: usize = 0x10_0000;
const CODE_ADDR: u64 = 0x1000;
const EXTRA_SLOT: u32 = 1;
const EXTRA_ADDR: u64 = 0x20_0000;
const EXTRA_SIZE: usize = 0x1_0000;

/// Anonymous memory mapped for the guest.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: an anonymous private mapping with no address hint; the
        // result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A VM with `n` vCPUs that each run to `hlt`.
pub struct Guest {
    vm: VmFd,
    vcpus: Vec<VcpuFd>,
    _mem: Mapping,
    extra: Mapping,
    extra_present: bool,
}

impl Guest {
    pub fn new(vcpus: u64) -> Result<Self, Box<dyn std::error::Error>> {
        let kvm = Kvm::new()?;
        let vm = kvm.create_vm()?;
        let mem = Mapping::new(MEM_SIZE)?;
        // SAFETY: `mem` is MEM_SIZE bytes and CODE_ADDR is inside it.
        unsafe { *mem.ptr.add(CODE_ADDR as usize) = 0xf4 }; // hlt
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: mem.ptr as u64,
            flags: 0,
        };
        // SAFETY: the mapping outlives the VM (both live in `Guest`, and the
        // VM fd is dropped first: fields drop in declaration order).
        unsafe { vm.set_user_memory_region(region)? };
        let extra = Mapping::new(EXTRA_SIZE)?;
        let mut guest = Self {
            vm,
            vcpus: Vec::new(),
            _mem: mem,
            extra,
            extra_present: false,
        };
        guest.add_extra_slot()?;
        for id in 0..vcpus {
            guest.vcpus.push(guest.vm.create_vcpu(id)?);
        }
        Ok(guest)
    }

    /// Runs every vCPU from the `hlt` at CODE_ADDR until it halts.
    pub fn run_to_hlt(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        for vcpu in &mut self.vcpus {
            let mut sregs = vcpu.get_sregs()?;
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            vcpu.set_sregs(&sregs)?;
            let mut regs = vcpu.get_regs()?;
            regs.rip = CODE_ADDR;
            regs.rflags = 2;
            vcpu.set_regs(&regs)?;
            match vcpu.run()? {
                VcpuExit::Hlt => {}
                other => return Err(format!("unexpected vCPU exit {other:?}").into()),
            }
        }
        Ok(())
    }

    fn add_extra_slot(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        let region = kvm_userspace_memory_region {
            slot: EXTRA_SLOT,
            guest_phys_addr: EXTRA_ADDR,
            memory_size: EXTRA_SIZE as u64,
            userspace_addr: self.extra.ptr as u64,
            flags: 0,
        };
        // SAFETY: the mapping outlives the VM, as in `new`.
        unsafe { self.vm.set_user_memory_region(region)? };
        self.extra_present = true;
        Ok(())
    }

    /// Deletes the extra memslot (one fast zap) and adds it back.
    pub fn churn_slot(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        let region = kvm_userspace_memory_region {
            slot: EXTRA_SLOT,
            guest_phys_addr: EXTRA_ADDR,
            memory_size: 0,
            userspace_addr: self.extra.ptr as u64,
            flags: 0,
        };
        // SAFETY: a zero-sized region deletes the slot; no memory is handed
        // to the kernel.
        unsafe { self.vm.set_user_memory_region(region)? };
        self.extra_present = false;
        self.add_extra_slot()
    }
}
