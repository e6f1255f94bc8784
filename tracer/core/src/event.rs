//! Decoded root events: the one userspace representation of what the probes
//! saw. JSON and the readable line are two renderings of it.
//!
//! Kernel pointers and physical addresses are hex strings in JSON (`"0x…"`),
//! because JSON numbers above 2^53 lose precision in most readers.

use std::{borrow::Cow, fmt::Write as _};

use serde::{Deserialize, Serialize};

use common::{COMM_LEN, EventKind, INVALID_PAGE, ProbeId, RootEvent, field};

impl Event {
    /// An event of `kind` at `ts_ns` with no probe, no task and every
    /// optional field unset: the base that parsers, the model and tests fill.
    pub fn bare(kind: Kind, ts_ns: u64) -> Self {
        Self {
            ts_ns,
            kind,
            probe: Cow::Borrowed(""),
            cpu: 0,
            pid: 0,
            tid: 0,
            comm: Comm::default(),
            kvm: None,
            vcpu: None,
            vcpu_id: None,
            userspace_pid: None,
            vm_type: None,
            root_hpa: None,
            root_pgd: None,
            mirror_root_hpa: None,
            root_role: None,
            mirror_role: None,
            mirror_stale: None,
            mmu_valid_gen: None,
            memslots_gen: None,
            ret: None,
            arg: None,
            before_hpa: None,
            duration_ns: None,
        }
    }

    /// Whether the kernel read the mirror root's page and found it invalid
    /// (`None`: not read).
    pub fn mirror_root_stale(&self) -> Option<bool> {
        self.mirror_stale
    }
}

/// What an event reports (see `common::EventKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    LoadEnter,
    LoadReturn,
    AllocDirectRoots,
    AllocRoot,
    ZapAllFast,
    InvalidateRoots,
    EntryTransition,
    EntryForbidden,
    RunExit,
    VcpuDestroy,
    VmDestroy,
}

impl Kind {
    pub const ALL: [Self; 11] = [
        Self::LoadEnter,
        Self::LoadReturn,
        Self::AllocDirectRoots,
        Self::AllocRoot,
        Self::ZapAllFast,
        Self::InvalidateRoots,
        Self::EntryTransition,
        Self::EntryForbidden,
        Self::RunExit,
        Self::VcpuDestroy,
        Self::VmDestroy,
    ];

    /// The kinds of event `probe` emits: the `events_total` series that
    /// exist (at 0) from the moment it attaches.
    pub fn emitted_by(probe: ProbeId) -> &'static [Self] {
        match probe {
            ProbeId::MmuLoad => &[Self::LoadEnter],
            ProbeId::MmuLoadRet => &[Self::LoadReturn],
            ProbeId::MmuAllocDirectRoots => &[Self::AllocDirectRoots],
            ProbeId::TdpMmuAllocRoot => &[],
            ProbeId::TdpMmuAllocRootRet => &[Self::AllocRoot],
            ProbeId::ZapAllFastKprobe | ProbeId::ZapAllFastTracepoint => &[Self::ZapAllFast],
            ProbeId::InvalidateRoots => &[Self::InvalidateRoots],
            ProbeId::KvmEntry => &[Self::EntryTransition, Self::EntryForbidden],
            ProbeId::KvmRunExit => &[Self::RunExit],
            ProbeId::VcpuDestroy => &[Self::VcpuDestroy],
            ProbeId::VmDestroy => &[Self::VmDestroy],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::LoadEnter => "load_enter",
            Self::LoadReturn => "load_return",
            Self::AllocDirectRoots => "alloc_direct_roots",
            Self::AllocRoot => "alloc_root",
            Self::ZapAllFast => "zap_all_fast",
            Self::InvalidateRoots => "invalidate_roots",
            Self::EntryTransition => "entry_transition",
            Self::EntryForbidden => "entry_forbidden",
            Self::RunExit => "run_exit",
            Self::VcpuDestroy => "vcpu_destroy",
            Self::VmDestroy => "vm_destroy",
        }
    }

    fn from_raw(k: EventKind) -> Self {
        match k {
            EventKind::LoadEnter => Self::LoadEnter,
            EventKind::LoadReturn => Self::LoadReturn,
            EventKind::AllocDirectRoots => Self::AllocDirectRoots,
            EventKind::AllocRoot => Self::AllocRoot,
            EventKind::ZapAllFast => Self::ZapAllFast,
            EventKind::InvalidateRoots => Self::InvalidateRoots,
            EventKind::EntryTransition => Self::EntryTransition,
            EventKind::EntryForbidden => Self::EntryForbidden,
            EventKind::RunExit => Self::RunExit,
            EventKind::VcpuDestroy => Self::VcpuDestroy,
            EventKind::VmDestroy => Self::VmDestroy,
        }
    }
}

/// One event. Fields the probe could not read (or that don't apply) are
/// `None` and left out of JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub ts_ns: u64,
    pub kind: Kind,
    /// The eBPF program that saw it (or `model` for simulated events).
    pub probe: Cow<'static, str>,
    pub cpu: u32,
    pub pid: u32,
    pub tid: u32,
    pub comm: Comm,
    #[serde(
        default,
        with = "crate::hexfmt::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub kvm: Option<u64>,
    #[serde(
        default,
        with = "crate::hexfmt::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub vcpu: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_id: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userspace_pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_type: Option<u8>,
    #[serde(
        default,
        with = "crate::hexfmt::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub root_hpa: Option<u64>,
    #[serde(
        default,
        with = "crate::hexfmt::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub root_pgd: Option<u64>,
    #[serde(
        default,
        with = "crate::hexfmt::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub mirror_root_hpa: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_role: Option<u32>,
    /// The `kvm_mmu_page_role` word of the mirror root's page, read by the
    /// kernel probe (TDX vCPUs with a valid mirror root, where the kernel
    /// allows it). For the record: the position of its `invalid` bit moves
    /// between kernels (11 up to 7.1, 12 from 7.2), so the verdict is
    /// `mirror_stale`, which the probe computed with the position from BTF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_role: Option<u32>,
    /// With `mirror_role`: whether that page's `role.invalid` is set, a
    /// stale mirror root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_stale: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmu_valid_gen: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memslots_gen: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arg: Option<u64>,
    #[serde(
        default,
        with = "crate::hexfmt::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub before_hpa: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ns: Option<u64>,
}

/// Why a ring-buffer record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {got} bytes is shorter than a root event ({want} bytes)")]
    Short { got: usize, want: usize },
    #[error("unknown event kind {0}")]
    Kind(u32),
    #[error("unknown probe id {0}")]
    Probe(u32),
}

impl Event {
    /// Decodes one ring-buffer record.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Self::from_raw(&read_raw(bytes)?)
    }

    /// Converts the kernel's struct, keeping only the fields marked valid.
    pub fn from_raw(raw: &RootEvent) -> Result<Self, DecodeError> {
        let kind = EventKind::from_u32(raw.kind).ok_or(DecodeError::Kind(raw.kind))?;
        let probe = ProbeId::from_u32(raw.probe).ok_or(DecodeError::Probe(raw.probe))?;
        let has = |bit: u32| raw.valid & bit != 0;
        let opt = |bit: u32, v: u64| has(bit).then_some(v);
        Ok(Self {
            ts_ns: raw.ts_ns,
            kind: Kind::from_raw(kind),
            probe: Cow::Borrowed(probe.program_name()),
            cpu: raw.cpu,
            pid: raw.pid,
            tid: raw.tid,
            comm: Comm::from_kernel(raw.comm),
            kvm: opt(field::KVM, raw.kvm),
            vcpu: opt(field::VCPU, raw.vcpu),
            vcpu_id: has(field::VCPU_ID).then_some(raw.vcpu_id),
            userspace_pid: has(field::USERSPACE_PID).then_some(raw.userspace_pid),
            vm_type: has(field::VM_TYPE).then_some(raw.vm_type),
            root_hpa: opt(field::ROOT_HPA, raw.root_hpa),
            root_pgd: opt(field::ROOT_PGD, raw.root_pgd),
            mirror_root_hpa: opt(field::MIRROR_ROOT_HPA, raw.mirror_root_hpa),
            root_role: has(field::ROOT_ROLE).then_some(raw.root_role),
            mirror_role: has(field::MIRROR_ROLE).then_some(raw.mirror_role),
            mirror_stale: has(field::MIRROR_ROLE).then(|| has(field::MIRROR_STALE)),
            mmu_valid_gen: has(field::MMU_VALID_GEN).then_some(raw.mmu_valid_gen),
            memslots_gen: opt(field::MEMSLOTS_GEN, raw.memslots_gen),
            ret: has(field::RET).then_some(raw.ret),
            arg: opt(field::ARG, raw.arg),
            before_hpa: opt(field::BEFORE_HPA, raw.before_hpa),
            duration_ns: opt(field::DURATION, raw.duration_ns),
        })
    }

    /// The event as one JSON line of the event log and of `watch --json`:
    /// `{"record":"event", …fields}` (no trailing newline).
    pub fn to_json_record(&self) -> String {
        let mut out = Vec::with_capacity(512);
        self.write_json_record(&mut out);
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }

    /// Appends the JSON record to `out`, reusing its allocation.
    pub fn write_json_record(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"record\":\"event\",");
        let start = out.len();
        serde_json::to_writer(&mut *out, self).expect("events always serialize");
        // Drop the object's own opening brace.
        out.remove(start);
    }

    /// One readable line (no trailing newline).
    pub fn to_line(&self) -> String {
        let mut s = format!(
            "{:>6}.{:06} cpu{:<3} {:<16} {}[{}/{}]",
            self.ts_ns / 1_000_000_000,
            (self.ts_ns % 1_000_000_000) / 1000,
            self.cpu,
            self.kind.name(),
            self.comm,
            self.pid,
            self.tid
        );
        let mut kv = |k: &str, v: String| {
            let _ = write!(s, " {k}={v}");
        };
        if let Some(v) = self.userspace_pid {
            kv("vmm", v.to_string());
        }
        if let Some(v) = self.kvm {
            kv("kvm", format!("{v:#x}"));
        }
        if let Some(v) = self.vm_type {
            kv("type", vm_type_name(v).into());
        }
        if let Some(v) = self.vcpu_id {
            kv("vcpu", v.to_string());
        }
        if let Some(v) = self.root_hpa {
            kv("root", hpa(v));
        }
        if let Some(v) = self.mirror_root_hpa {
            kv("mirror", hpa(v));
        }
        if let Some(v) = self.root_role {
            kv("role", format!("{v:#x}"));
        }
        if let Some(v) = self.mirror_role {
            kv("mirror_role", format!("{v:#x}"));
        }
        if self.mirror_stale == Some(true) {
            kv("mirror", "STALE".into());
        }
        if let Some(v) = self.mmu_valid_gen {
            kv("gen", v.to_string());
        }
        if let Some(v) = self.memslots_gen {
            kv("slots_gen", v.to_string());
        }
        if let Some(v) = self.arg {
            let name = match self.kind {
                Kind::AllocRoot => "mirror",
                Kind::InvalidateRoots => "root_types",
                _ => "arg",
            };
            kv(name, v.to_string());
        }
        if let Some(v) = self.before_hpa {
            kv("before", hpa(v));
        }
        if let Some(v) = self.ret {
            kv("ret", v.to_string());
        }
        if let Some(v) = self.duration_ns {
            kv("took", format!("{v}ns"));
        }
        s
    }
}

/// A task's `comm`, stored inline (no allocation per event): up to 16
/// bytes, NUL-padded, shown as (lossy) UTF-8.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm([u8; COMM_LEN]);

impl Comm {
    /// From the kernel's NUL-padded bytes.
    pub fn from_kernel(bytes: [u8; COMM_LEN]) -> Self {
        Self(bytes)
    }

    /// From a string of at most 16 bytes.
    pub fn new(s: &str) -> Result<Self, String> {
        let b = s.as_bytes();
        if b.len() > COMM_LEN {
            return Err(format!("comm {s:?} is longer than {COMM_LEN} bytes"));
        }
        let mut out = [0; COMM_LEN];
        out[..b.len()].copy_from_slice(b);
        Ok(Self(out))
    }

    pub fn as_bytes(&self) -> &[u8] {
        let len = self.0.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        &self.0[..len]
    }
}

/// Shown with control characters escaped (`\x1b`): a VMM sets its own
/// thread names, and raw terminal escapes must not reach a terminal.
impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in String::from_utf8_lossy(self.as_bytes()).chars() {
            if c.is_control() {
                write!(f, "\\x{:02x}", u32::from(c))?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl Serialize for Comm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(self.as_bytes()) {
            Ok(v) => s.serialize_str(v),
            Err(_) => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Comm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

impl PartialEq<&str> for Comm {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

/// Copies a `RootEvent` out of a record that may be unaligned.
fn read_raw(bytes: &[u8]) -> Result<RootEvent, DecodeError> {
    let want = size_of::<RootEvent>();
    if bytes.len() < want {
        return Err(DecodeError::Short {
            got: bytes.len(),
            want,
        });
    }
    // SAFETY: the slice holds at least size_of::<RootEvent>() bytes,
    // RootEvent is plain old data valid for any bit pattern, and
    // read_unaligned has no alignment requirement.
    Ok(unsafe { bytes.as_ptr().cast::<RootEvent>().read_unaligned() })
}

/// `INVALID` for `INVALID_PAGE`, else hex.
pub fn hpa(v: u64) -> String {
    if v == INVALID_PAGE {
        "INVALID".into()
    } else {
        format!("{v:#x}")
    }
}

/// Names of `kvm->arch.vm_type` values.
pub fn vm_type_name(v: u8) -> &'static str {
    match v {
        0 => "default",
        1 => "sw-protected",
        2 => "sev",
        3 => "sev-es",
        4 => "sev-snp",
        5 => "tdx",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_zap() -> RootEvent {
        let mut r = RootEvent::ZERO;
        r.ts_ns = 1_500_000_123;
        r.kind = EventKind::ZapAllFast as u32;
        r.probe = ProbeId::ZapAllFastTracepoint as u32;
        r.kvm = 0xffff_8881_0000_1000;
        r.userspace_pid = 42;
        r.mmu_valid_gen = 1;
        r.mirror_root_hpa = INVALID_PAGE;
        r.valid = field::KVM | field::USERSPACE_PID | field::MMU_VALID_GEN;
        r.comm[..4].copy_from_slice(b"qemu");
        r
    }

    fn bytes_of(r: &RootEvent) -> Vec<u8> {
        // SAFETY: RootEvent is repr(C) plain data; reading its bytes is fine.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(r).cast::<u8>(), size_of::<RootEvent>())
        }
        .to_vec()
    }

    #[test]
    fn decodes_only_valid_fields() {
        let ev = Event::decode(&bytes_of(&raw_zap())).unwrap();
        assert_eq!(ev.kind, Kind::ZapAllFast);
        assert_eq!(ev.probe, "kvm_mmu_zap_all_fast_tp");
        assert_eq!(ev.kvm, Some(0xffff_8881_0000_1000));
        assert_eq!(ev.userspace_pid, Some(42));
        assert_eq!(ev.mmu_valid_gen, Some(1));
        assert_eq!(ev.mirror_root_hpa, None, "not marked valid");
        assert_eq!(ev.comm, "qemu");
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        let b = bytes_of(&raw_zap());
        assert_eq!(
            Event::decode(&b[..10]),
            Err(DecodeError::Short {
                got: 10,
                want: size_of::<RootEvent>()
            })
        );
        let mut r = raw_zap();
        r.kind = 99;
        assert_eq!(Event::decode(&bytes_of(&r)), Err(DecodeError::Kind(99)));
        let mut r = raw_zap();
        r.probe = 99;
        assert_eq!(Event::decode(&bytes_of(&r)), Err(DecodeError::Probe(99)));
    }

    #[test]
    fn json_round_trips_with_hex_pointers() {
        let mut r = raw_zap();
        r.valid |= field::MIRROR_ROOT_HPA;
        let ev = Event::decode(&bytes_of(&r)).unwrap();
        let json = serde_json::to_string(&ev).unwrap();
        assert!(json.contains(r#""kvm":"0xffff888100001000""#), "{json}");
        assert!(
            json.contains(r#""mirror_root_hpa":"0xffffffffffffffff""#),
            "{json}"
        );
        assert!(
            !json.contains("vcpu_id"),
            "absent fields are left out: {json}"
        );
        let back: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn comm_escapes_terminal_control_characters() {
        let mut r = raw_zap();
        r.comm = *b"\x1b]0;pwn\x07\x1b[2J\0\0\0\0";
        let ev = Event::decode(&bytes_of(&r)).unwrap();
        let line = ev.to_line();
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains("\\x1b]0;pwn\\x07\\x1b[2J"), "{line}");
        // JSON keeps the bytes, escaped by the JSON encoder.
        let json = ev.to_json_record();
        assert!(
            json.contains(r#""comm":"\u001b]0;pwn\u0007\u001b[2J""#),
            "{json}"
        );
    }

    #[test]
    fn readable_line_names_invalid_page() {
        let mut r = raw_zap();
        r.valid |= field::MIRROR_ROOT_HPA;
        let line = Event::decode(&bytes_of(&r)).unwrap().to_line();
        assert!(line.starts_with("     1.500000 cpu0"), "{line}");
        assert!(line.contains("zap_all_fast"), "{line}");
        assert!(line.contains("mirror=INVALID"), "{line}");
        assert!(line.contains("vmm=42"), "{line}");
    }
}
