//! What the detector reports: the kinds of finding, their severity, the
//! finding itself with its evidence and text, and errno names.

use serde::{Deserialize, Serialize};

use crate::event::Event;

/// What a finding says happened. The names are stable: alert routing keys
/// on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    MirrorRootInvalidAtEntry,
    MirrorRootInvalidAfterLoad,
    MirrorRootReallocWhileValid,
    MirrorRootChangedWithoutTeardown,
    MirrorRootsInvalidatedLive,
    MmuLoadFailed,
    ZapStorm,
    MirrorRootStaleAtEntry,
    MirrorRootStaleAfterLoad,
}

impl FindingKind {
    pub const ALL: [Self; 9] = [
        Self::MirrorRootInvalidAtEntry,
        Self::MirrorRootInvalidAfterLoad,
        Self::MirrorRootStaleAtEntry,
        Self::MirrorRootStaleAfterLoad,
        Self::MirrorRootReallocWhileValid,
        Self::MirrorRootChangedWithoutTeardown,
        Self::MirrorRootsInvalidatedLive,
        Self::MmuLoadFailed,
        Self::ZapStorm,
    ];

    /// The alert both routes give it: the shipped Prometheus rule's name
    /// (dist/prometheus), and the `alertname` of a pushed alert.
    pub fn alertname(self) -> &'static str {
        match self {
            Self::MirrorRootInvalidAtEntry
            | Self::MirrorRootInvalidAfterLoad
            | Self::MirrorRootStaleAtEntry
            | Self::MirrorRootStaleAfterLoad => "KvmMirrorRootInvalid",
            Self::MirrorRootReallocWhileValid
            | Self::MirrorRootChangedWithoutTeardown
            | Self::MirrorRootsInvalidatedLive => "KvmMirrorRootLifecycleFault",
            Self::MmuLoadFailed => "KvmMmuLoadFailures",
            Self::ZapStorm => "KvmZapStorm",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::MirrorRootInvalidAtEntry => "mirror_root_invalid_at_entry",
            Self::MirrorRootInvalidAfterLoad => "mirror_root_invalid_after_load",
            Self::MirrorRootReallocWhileValid => "mirror_root_realloc_while_valid",
            Self::MirrorRootChangedWithoutTeardown => "mirror_root_changed_without_teardown",
            Self::MirrorRootsInvalidatedLive => "mirror_roots_invalidated_live",
            Self::MmuLoadFailed => "mmu_load_failed",
            Self::ZapStorm => "zap_storm",
            Self::MirrorRootStaleAtEntry => "mirror_root_stale_at_entry",
            Self::MirrorRootStaleAfterLoad => "mirror_root_stale_after_load",
        }
    }

    pub fn severity(self) -> Severity {
        match self {
            Self::MirrorRootInvalidAtEntry
            | Self::MirrorRootInvalidAfterLoad
            | Self::MirrorRootStaleAtEntry
            | Self::MirrorRootStaleAfterLoad => Severity::Critical,
            Self::MirrorRootReallocWhileValid
            | Self::MirrorRootChangedWithoutTeardown
            | Self::MirrorRootsInvalidatedLive => Severity::Error,
            Self::MmuLoadFailed => Severity::Warning,
            Self::ZapStorm => Severity::Info,
        }
    }

    /// Whether the kind is about TDX mirror roots (never raised for other
    /// VM types).
    pub fn is_mirror(self) -> bool {
        !matches!(self, Self::MmuLoadFailed | Self::ZapStorm)
    }
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    #[default]
    Info,
    Warning,
    Error,
    Critical,
}

impl Severity {
    /// `info`, `warning`, `error` or `critical`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "info" => Ok(Self::Info),
            "warning" => Ok(Self::Warning),
            "error" => Ok(Self::Error),
            "critical" => Ok(Self::Critical),
            _ => Err(format!("{s:?} is not info, warning, error or critical")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Error => "error",
            Self::Critical => "critical",
        }
    }
}

/// One finding: what, where, the events that prove it, and what to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub severity: Severity,
    /// Timestamp of the event that raised it.
    pub ts_ns: u64,
    #[serde(with = "crate::hexfmt")]
    pub kvm: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userspace_pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_id: Option<i32>,
    #[serde(
        default,
        with = "crate::hexfmt::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub vcpu: Option<u64>,
    /// The events that prove it, oldest first.
    pub evidence: Vec<Event>,
    /// A paragraph a host engineer can act on.
    pub explanation: String,
    /// The VM's names (QEMU `-name`, `-uuid`, libvirt domain), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<crate::vmid::VmIdentity>,
}

impl Finding {
    /// A finding about a whole VM (no vCPU), with `ev` as its evidence.
    pub(super) fn about_vm(
        kind: FindingKind,
        ev: &Event,
        kvm: u64,
        userspace_pid: Option<i32>,
        explanation: String,
    ) -> Self {
        Self {
            vm: None,
            kind,
            severity: kind.severity(),
            ts_ns: ev.ts_ns,
            kvm,
            userspace_pid,
            vcpu_id: None,
            vcpu: None,
            evidence: vec![ev.clone()],
            explanation,
        }
    }

    /// `{"record":"finding", …}` (no trailing newline).
    pub fn to_json_record(&self) -> String {
        let body = serde_json::to_string(self).expect("findings always serialize");
        format!("{{\"record\":\"finding\",{}", &body[1..])
    }
}

/// `text` in lines of at most `width` characters (words kept whole).
pub(crate) fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        if !cur.is_empty() && cur.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

/// Symbolic name of a negative errno.
pub fn errno_name(ret: i64) -> &'static str {
    match -ret {
        1 => "-EPERM",
        4 => "-EINTR",
        5 => "-EIO",
        11 => "-EAGAIN",
        12 => "-ENOMEM",
        14 => "-EFAULT",
        16 => "-EBUSY",
        22 => "-EINVAL",
        28 => "-ENOSPC",
        _ => "an error",
    }
}
