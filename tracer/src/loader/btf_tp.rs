//! The `kvm_entry` gate as a BTF-enabled tracepoint (`tp_btf`), loaded by
//! hand.
//!
//! aya 0.14's `BtfTracePoint::load` finds the attach point in a parsed
//! vmlinux BTF (the multi-MiB parse that start-up avoids) and can't name a
//! module's BTF object, and KVM is a module on distribution kernels. So this
//! module loads the program itself: it relocates the object's instructions
//! against the maps aya already created (with `aya_obj`, the relocation code
//! aya itself runs), then calls `BPF_PROG_LOAD` with the plan's BTF type id
//! and, when KVM is a module, an fd of the module's BTF object, and attaches
//! with `BPF_RAW_TRACEPOINT_OPEN`.

use std::{
    collections::HashSet,
    ffi::CString,
    io,
    os::fd::{AsFd as _, AsRawFd, OwnedFd},
};

use aya::{
    Ebpf,
    maps::{Map, MapData},
};

use crate::{
    kernel::BtfTracepoint,
    sys_bpf::{BPF_PROG_LOAD, ProgLoadAttr, bpf, owned},
};

/// The eBPF object's maps as aya created them, by name, each fd our own.
/// Taken before aya-log takes its map out of the `Ebpf`.
pub struct MapFds(Vec<(String, OwnedFd)>);

impl MapFds {
    pub fn of(ebpf: &Ebpf) -> Self {
        Self(
            ebpf.maps()
                .filter_map(|(name, map)| {
                    let fd = map_data(map)?.fd().as_fd().try_clone_to_owned().ok()?;
                    Some((name.to_owned(), fd))
                })
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&OwnedFd> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, fd)| fd)
    }
}

fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::HashMap(d)
        | Map::PerCpuHashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::RingBuf(d)
        | Map::PerfEventArray(d) => Some(d),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BtfTpError {
    #[error("the eBPF object can't be relocated")]
    Object(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(String),
    #[error("map {0} of the eBPF object was not created")]
    MissingMap(String),
    #[error("the kernel has no BTF object named {0} (CONFIG_DEBUG_INFO_BTF_MODULES)")]
    NoBtfObject(String),
    #[error("{call} failed")]
    Syscall {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused {program}: {error}{log}")]
    Load {
        program: String,
        error: io::Error,
        /// The verifier's last lines, when it said something.
        log: String,
    },
}

/// A loaded and attached tracing program; dropping it detaches it.
pub struct TracingProgram {
    pub name: &'static str,
    prog: OwnedFd,
    _link: OwnedFd,
}

impl TracingProgram {
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.prog.as_raw_fd()
    }

    /// The kernel's run time (ns) and run count of the program.
    pub fn stats(&self) -> Option<(u64, u64)> {
        // SAFETY: bpf_prog_info is a plain C struct of integers; all zeroes
        // is a valid value.
        let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
        let mut attr = InfoAttr {
            bpf_fd: u32::try_from(self.prog.as_raw_fd()).ok()?,
            info_len: u32::try_from(size_of_val(&info)).ok()?,
            info: (&raw mut info) as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).ok()?;
        Some((info.run_time_ns, info.run_cnt))
    }
}

/// Loads and attaches `target`'s programs: the gate, and its empty floor
/// program too with `baseline`.
pub fn attach(
    object: &[u8],
    maps: &MapFds,
    target: &BtfTracepoint,
    baseline: bool,
) -> Result<Vec<TracingProgram>, BtfTpError> {
    let (obj, btf_fd) = prepare(object, maps, target)?;
    let mut names = vec![target.program];
    if baseline {
        names.push(target.floor);
    }
    names
        .into_iter()
        .map(|name| {
            let prog = load(&obj, name, target.type_id, btf_fd.as_ref())?;
            let link = raw_tracepoint_open(&prog)?;
            Ok(TracingProgram {
                name,
                prog,
                _link: link,
            })
        })
        .collect()
}

/// Loads `target`'s gate without attaching it: the verifier's verdict.
pub fn verify(object: &[u8], maps: &MapFds, target: &BtfTracepoint) -> Result<(), BtfTpError> {
    let (obj, btf_fd) = prepare(object, maps, target)?;
    load(&obj, target.program, target.type_id, btf_fd.as_ref()).map(drop)
}

/// The relocated object, and the BTF object `target` attaches by (`None`:
/// vmlinux's, which needs no fd).
fn prepare(
    object: &[u8],
    maps: &MapFds,
    target: &BtfTracepoint,
) -> Result<(aya_obj::Object, Option<OwnedFd>), BtfTpError> {
    let obj = relocated(object, maps)?;
    let btf_fd = target.module.as_deref().map(module_btf).transpose()?;
    Ok((obj, btf_fd))
}

/// The object with its map references and calls resolved, as aya's loader
/// resolves them, against the maps aya created.
fn relocated(object: &[u8], maps: &MapFds) -> Result<aya_obj::Object, BtfTpError> {
    let object_error = |e: Box<dyn std::error::Error + Send + Sync>| BtfTpError::Object(e);
    let mut obj = aya_obj::Object::parse(object).map_err(|e| object_error(Box::new(e)))?;
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    let defs: Vec<(String, aya_obj::Map)> = obj
        .maps
        .iter()
        .map(|(n, m)| (n.clone(), m.clone()))
        .collect();
    let fds = defs
        .iter()
        .map(|(n, _)| {
            maps.get(n)
                .map(AsRawFd::as_raw_fd)
                .ok_or_else(|| BtfTpError::MissingMap(n.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    obj.relocate_maps(
        defs.iter()
            .zip(fds)
            .map(|((n, def), fd)| (n.as_str(), fd, def)),
        &text_sections,
    )
    .map_err(|e| object_error(Box::new(e)))?;
    obj.relocate_calls(&text_sections)
        .map_err(|e| object_error(Box::new(e)))?;
    Ok(obj)
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;
const BPF_BTF_GET_NEXT_ID: libc::c_long = 23;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_RAW_TP: u32 = 23;

/// `union bpf_attr`'s `info` member (BPF_OBJ_GET_INFO_BY_FD).
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `union bpf_attr`'s id members (BPF_*_GET_NEXT_ID, BPF_*_GET_FD_BY_ID).
#[repr(C)]
#[derive(Default)]
struct IdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `union bpf_attr`'s `raw_tracepoint` member.
#[repr(C)]
#[derive(Default)]
struct RawTpAttr {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

/// `struct bpf_btf_info`.
#[repr(C)]
#[derive(Default)]
struct BtfInfo {
    btf: u64,
    btf_size: u32,
    id: u32,
    name: u64,
    name_len: u32,
    kernel_btf: u32,
}

/// An fd of the kernel's BTF object named `module` (a module's split BTF).
fn module_btf(module: &str) -> Result<OwnedFd, BtfTpError> {
    let syscall = |call| move |source| BtfTpError::Syscall { call, source };
    let mut id = 0;
    loop {
        let mut attr = IdAttr {
            id,
            ..IdAttr::default()
        };
        match bpf(BPF_BTF_GET_NEXT_ID, &mut attr) {
            Ok(_) => id = attr.next_id,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(BtfTpError::NoBtfObject(module.to_owned()));
            }
            Err(e) => return Err(syscall("BPF_BTF_GET_NEXT_ID")(e)),
        }
        let mut attr = IdAttr {
            id,
            ..IdAttr::default()
        };
        let fd = match bpf(BPF_BTF_GET_FD_BY_ID, &mut attr) {
            Ok(fd) => owned(fd),
            // Unloaded between the two calls.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(syscall("BPF_BTF_GET_FD_BY_ID")(e)),
        };
        let mut name = [0u8; 64];
        let mut info = BtfInfo {
            name: name.as_mut_ptr() as u64,
            name_len: 64,
            ..BtfInfo::default()
        };
        let mut attr = InfoAttr {
            bpf_fd: u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX),
            info_len: u32::try_from(size_of::<BtfInfo>()).unwrap_or(0),
            info: (&raw mut info) as u64,
        };
        // An object whose info can't be read (a name longer than the
        // buffer: no module's) is not the one.
        if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).is_err() {
            continue;
        }
        let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        if info.kernel_btf != 0 && &name[..len] == module.as_bytes() {
            return Ok(fd);
        }
    }
}

/// Loads one program of `obj` as a tp_btf program on BTF type `type_id`.
fn load(
    obj: &aya_obj::Object,
    name: &str,
    type_id: u32,
    btf_obj: Option<&OwnedFd>,
) -> Result<OwnedFd, BtfTpError> {
    let program = obj
        .programs
        .get(name)
        .ok_or_else(|| BtfTpError::MissingProgram(name.to_owned()))?;
    let function = obj
        .functions
        .get(&program.function_key())
        .ok_or_else(|| BtfTpError::MissingProgram(name.to_owned()))?;
    let insns = &function.instructions;
    let license: &CString = &program.license;
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let attr = |log: &mut Vec<u8>| {
        let (log_level, log_size, log_buf) = log_attr(log);
        ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_TRACING,
            insn_cnt: u32::try_from(insns.len()).unwrap_or(u32::MAX),
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level,
            log_size,
            log_buf,
            prog_name,
            expected_attach_type: BPF_TRACE_RAW_TP,
            attach_btf_id: type_id,
            attach_btf_obj_fd: btf_obj.map_or(0, |fd| u32::try_from(fd.as_raw_fd()).unwrap_or(0)),
            ..ProgLoadAttr::default()
        }
    };
    let mut no_log = Vec::new();
    let first = bpf(BPF_PROG_LOAD, &mut attr(&mut no_log));
    let source = match first {
        Ok(fd) => return Ok(owned(fd)),
        Err(e) => e,
    };
    // Again with the verifier's log, for the error (a refusal for lack of
    // rights has none).
    let mut log = vec![0u8; 1 << 20];
    if let Ok(fd) = bpf(BPF_PROG_LOAD, &mut attr(&mut log)) {
        return Ok(owned(fd));
    }
    let text =
        String::from_utf8_lossy(&log[..log.iter().position(|&b| b == 0).unwrap_or(0)]).into_owned();
    let tail: Vec<&str> = text.lines().rev().take(12).collect();
    let log = if tail.is_empty() {
        String::new()
    } else {
        format!(
            "; the verifier said:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    };
    Err(BtfTpError::Load {
        program: name.to_owned(),
        error: source,
        log,
    })
}

/// The log fields of `BPF_PROG_LOAD` for `log` (level, size, buffer): none
/// for an empty one. The kernel refuses a buffer without a size (EINVAL),
/// and a log makes the verifier many times slower (40 ms here for the
/// gate), so the first load asks for none.
fn log_attr(log: &mut [u8]) -> (u32, u32, u64) {
    if log.is_empty() {
        (0, 0, 0)
    } else {
        (
            1,
            u32::try_from(log.len()).unwrap_or(u32::MAX),
            log.as_mut_ptr() as u64,
        )
    }
}

/// Attaches a loaded tp_btf program to its tracepoint.
fn raw_tracepoint_open(prog: &OwnedFd) -> Result<OwnedFd, BtfTpError> {
    let mut attr = RawTpAttr {
        prog_fd: u32::try_from(prog.as_raw_fd()).unwrap_or(u32::MAX),
        ..RawTpAttr::default()
    };
    bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr)
        .map(owned)
        .map_err(|source| BtfTpError::Syscall {
            call: "BPF_RAW_TRACEPOINT_OPEN",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::log_attr;

    /// The first load asks for no log at all: a buffer pointer without a
    /// size (what an empty `Vec` gives) is refused with EINVAL, and the
    /// retry with a log then loaded the gate 40 ms slower.
    #[test]
    fn no_log_means_no_log_buffer() {
        assert_eq!(log_attr(&mut Vec::new()), (0, 0, 0));
        let mut log = vec![0u8; 4096];
        let (level, size, buf) = log_attr(&mut log);
        assert_eq!((level, size), (1, 4096));
        assert_ne!(buf, 0);
    }
}
