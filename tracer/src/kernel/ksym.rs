//! Kernel symbols looked up by name, without printing all of kallsyms.
//!
//! The kernel takes 70-90 ms to print `/proc/kallsyms` (over 100,000
//! lines), and the plan asks about a dozen names. A `BPF_PROG_TYPE_SYSCALL`
//! program may call the helper `bpf_kallsyms_lookup_name` (Linux 5.16), and
//! `BPF_PROG_TEST_RUN` runs it on demand: a few microseconds per name. The
//! program is 28 instructions, assembled here; it takes a NUL-padded name
//! in its context and writes the address back there.
//!
//! The helper answers what `kallsyms_lookup_name()` answers: vmlinux's
//! symbols, then the modules'. It gives no type letter and no module, and it
//! refuses (EPERM) where kallsyms would hide addresses from the caller; the
//! caller then reads kallsyms instead.

use std::{io, os::fd::AsRawFd as _, os::fd::OwnedFd};

use crate::sys_bpf::{BPF_PROG_LOAD, BPF_PROG_TEST_RUN, ProgLoadAttr, TestRunAttr, bpf, owned};

const BPF_PROG_TYPE_SYSCALL: u32 = 31;
const BPF_F_SLEEPABLE: u32 = 1 << 4;
const BPF_FUNC_KALLSYMS_LOOKUP_NAME: i32 = 179;

/// The longest name looked up, NUL included.
pub const NAME_MAX: usize = 64;

/// The program's context: the address out, the name in.
#[repr(C)]
struct Ctx {
    addr: u64,
    name: [u8; NAME_MAX],
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// `r6 = ctx; copy the name to the stack; r0 =
/// bpf_kallsyms_lookup_name(name, NAME_MAX, 0, &addr); ctx->addr = addr;
/// return r0`. The name is copied because older verifiers take no context
/// pointer for a helper's memory argument.
fn program() -> Vec<Insn> {
    const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
    const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const ADD64_K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
    const LDX_DW: u8 = 0x79; // BPF_LDX | BPF_MEM | BPF_DW
    const STX_DW: u8 = 0x7b; // BPF_STX | BPF_MEM | BPF_DW
    const ST_DW: u8 = 0x7a; // BPF_ST | BPF_MEM | BPF_DW
    const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
    const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
    const NAME_AT: i16 = 8; // offset_of!(Ctx, name)
    const STACK_NAME: i16 = -(NAME_MAX as i16);
    const STACK_ADDR: i16 = STACK_NAME - 8;
    let mut p = vec![insn(MOV64_X, 6, 1, 0, 0)];
    for i in 0..(NAME_MAX as i16 / 8) {
        p.push(insn(LDX_DW, 0, 6, NAME_AT + 8 * i, 0));
        p.push(insn(STX_DW, 10, 0, STACK_NAME + 8 * i, 0));
    }
    p.extend([
        insn(ST_DW, 10, 0, STACK_ADDR, 0),
        insn(MOV64_X, 1, 10, 0, 0),
        insn(ADD64_K, 1, 0, 0, i32::from(STACK_NAME)),
        insn(MOV64_K, 2, 0, 0, NAME_MAX as i32),
        insn(MOV64_K, 3, 0, 0, 0),
        insn(MOV64_X, 4, 10, 0, 0),
        insn(ADD64_K, 4, 0, 0, i32::from(STACK_ADDR)),
        insn(CALL, 0, 0, 0, BPF_FUNC_KALLSYMS_LOOKUP_NAME),
        insn(LDX_DW, 1, 10, STACK_ADDR, 0),
        insn(STX_DW, 6, 1, 0, 0),
        insn(EXIT, 0, 0, 0, 0),
    ]);
    p
}

/// The loaded lookup program.
pub struct Lookup {
    prog: OwnedFd,
}

impl Lookup {
    /// Loads the program; fails where the kernel has no syscall programs or
    /// no such helper (before 5.16), or without CAP_BPF.
    pub fn load() -> io::Result<Self> {
        let insns = program();
        let license = c"GPL";
        let mut prog_name = [0u8; 16];
        prog_name[..11].copy_from_slice(b"ksym_lookup");
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_SYSCALL,
            insn_cnt: u32::try_from(insns.len()).unwrap_or(u32::MAX),
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_flags: BPF_F_SLEEPABLE,
            prog_name,
            ..ProgLoadAttr::default()
        };
        bpf(BPF_PROG_LOAD, &mut attr).map(|fd| Self { prog: owned(fd) })
    }

    /// The address of `name`: `Ok(None)` when the kernel has no such
    /// symbol, an error when it won't say (EPERM: addresses hidden from
    /// this user) or the name is too long.
    pub fn address(&self, name: &str) -> io::Result<Option<u64>> {
        if name.len() >= NAME_MAX || name.as_bytes().contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("symbol name {name:?} can't be looked up"),
            ));
        }
        let mut ctx = Ctx {
            addr: 0,
            name: [0; NAME_MAX],
        };
        ctx.name[..name.len()].copy_from_slice(name.as_bytes());
        let mut attr = TestRunAttr {
            prog_fd: u32::try_from(self.prog.as_raw_fd()).unwrap_or(u32::MAX),
            ctx_size_in: size_of::<Ctx>() as u32,
            ctx_in: (&raw mut ctx) as u64,
            ..TestRunAttr::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr)?;
        // The helper's return value, an errno as a negative int.
        match attr.retval as i32 {
            0 => Ok(Some(ctx.addr)),
            e if e == -libc::ENOENT => Ok(None),
            e => Err(io::Error::from_raw_os_error(-e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_reads_its_whole_context_and_exits() {
        let p = program();
        assert_eq!(p.len(), 1 + 2 * NAME_MAX / 8 + 11);
        assert_eq!(p.last().map(|i| i.code), Some(0x95));
        assert_eq!(size_of::<Insn>(), 8);
        assert_eq!(std::mem::offset_of!(Ctx, name), 8);
    }

    #[test]
    fn names_that_cant_be_passed_are_refused_before_the_kernel() {
        // No fd is needed to refuse them: a closed one would fail anyway.
        let lookup = Lookup {
            prog: std::fs::File::open("/dev/null").unwrap().into(),
        };
        for name in ["a\0b", &"x".repeat(NAME_MAX)] {
            let e = lookup.address(name).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{name:?}");
        }
    }
}
