//! The bpf(2) system call, for what aya 0.14 can't do: the tp_btf gate
//! with a module's BTF (`loader::btf_tp`) and symbol lookups by name
//! (`kernel::ksym`).

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
};

pub(crate) const BPF_PROG_LOAD: libc::c_long = 5;
pub(crate) const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// `union bpf_attr`'s `prog_load` member, up to `attach_btf_obj_fd`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct ProgLoadAttr {
    pub(crate) prog_type: u32,
    pub(crate) insn_cnt: u32,
    pub(crate) insns: u64,
    pub(crate) license: u64,
    pub(crate) log_level: u32,
    pub(crate) log_size: u32,
    pub(crate) log_buf: u64,
    pub(crate) kern_version: u32,
    pub(crate) prog_flags: u32,
    pub(crate) prog_name: [u8; 16],
    pub(crate) prog_ifindex: u32,
    pub(crate) expected_attach_type: u32,
    pub(crate) prog_btf_fd: u32,
    pub(crate) func_info_rec_size: u32,
    pub(crate) func_info: u64,
    pub(crate) func_info_cnt: u32,
    pub(crate) line_info_rec_size: u32,
    pub(crate) line_info: u64,
    pub(crate) line_info_cnt: u32,
    pub(crate) attach_btf_id: u32,
    pub(crate) attach_btf_obj_fd: u32,
    pub(crate) _pad: u32,
}

/// `union bpf_attr`'s `test` member (BPF_PROG_TEST_RUN).
#[repr(C)]
#[derive(Default)]
pub(crate) struct TestRunAttr {
    pub(crate) prog_fd: u32,
    pub(crate) retval: u32,
    pub(crate) data_size_in: u32,
    pub(crate) data_size_out: u32,
    pub(crate) data_in: u64,
    pub(crate) data_out: u64,
    pub(crate) repeat: u32,
    pub(crate) duration: u32,
    pub(crate) ctx_size_in: u32,
    pub(crate) ctx_size_out: u32,
    pub(crate) ctx_in: u64,
    pub(crate) ctx_out: u64,
    pub(crate) flags: u32,
    pub(crate) cpu: u32,
    pub(crate) batch_size: u32,
    pub(crate) _pad: u32,
}

/// The bpf(2) system call with one of the attribute structs above.
pub(crate) fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `cmd`,
    // its size passed along, with every pointer inside it pointing to memory
    // that outlives the call; the kernel reads it and writes only inside it
    // and the buffers it points to, within the sizes given.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of an fd a bpf(2) call returned.
pub(crate) fn owned(fd: libc::c_long) -> OwnedFd {
    let fd = i32::try_from(fd).expect("bpf(2) returns fds that fit an int");
    // SAFETY: the kernel just returned this fd to us, and nothing else owns
    // it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
