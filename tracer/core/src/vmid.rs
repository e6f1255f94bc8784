//! Which VM a `userspace_pid` is: QEMU's `-name` and `-uuid`, and the
//! libvirt domain, read once from `/proc/<pid>` when the daemon first sees
//! the VMM, then written to the event log (a `vm` record) so that replay
//! names the VM too after the pid is gone or reused. Findings, alerts and
//! `top` carry these names instead of kernel pointers.

use foldhash::HashMap;

use serde::{Deserialize, Serialize};

/// A VM's names; every field may be absent (a VMM that is not QEMU).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmIdentity {
    /// QEMU's `-name guest=NAME` (or `-name NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// QEMU's `-uuid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// The libvirt domain, from the VMM's `machine-qemu-N-NAME.scope`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_domain: Option<String>,
}

impl VmIdentity {
    pub fn is_empty(&self) -> bool {
        self.name.is_none() && self.uuid.is_none() && self.libvirt_domain.is_none()
    }

    /// `name` (or the domain, or the uuid): how a person calls the VM.
    pub fn display_name(&self) -> Option<&str> {
        self.name
            .as_deref()
            .or(self.libvirt_domain.as_deref())
            .or(self.uuid.as_deref())
    }
}

/// `{"record":"vm", …}`: the identity of the VMM `userspace_pid`, as seen
/// at `ts_ns` (CLOCK_MONOTONIC).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmRecord {
    pub ts_ns: u64,
    pub userspace_pid: i32,
    #[serde(flatten)]
    pub identity: VmIdentity,
}

impl VmRecord {
    pub fn to_json_record(&self) -> String {
        let fields = serde_json::to_string(self).expect("a VmRecord serializes");
        // `record` first, as in every other record.
        format!("{{\"record\":\"vm\",{}", &fields[1..])
    }
}

/// The longest name kept (label values stay small).
const NAME_MAX: usize = 128;

/// What a name becomes before it is a label or a log field: printable,
/// at most [`NAME_MAX`] characters; `None` if nothing is left.
fn clean(s: &str) -> Option<String> {
    let s: String = s
        .chars()
        .filter(|c| !c.is_control())
        .take(NAME_MAX)
        .collect();
    let s = s.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

/// Splits a QEMU option value at single commas (`,,` is a literal comma).
fn qemu_opts(v: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().expect("one at least").push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().expect("one at least").push(c);
        }
    }
    out
}

/// The names in a QEMU command line (`/proc/<pid>/cmdline`: NUL-separated).
pub fn from_cmdline(raw: &[u8]) -> VmIdentity {
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let mut id = VmIdentity::default();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let (opt, inline) = match a.split_once('=') {
            Some((o, v)) if o.starts_with('-') => (o, Some(v.to_owned())),
            _ => (a, None),
        };
        let opt = opt.strip_prefix("--").or_else(|| opt.strip_prefix('-'));
        let value = || inline.clone().or_else(|| args.get(i + 1).cloned());
        match opt {
            Some("name") => {
                if let Some(v) = value() {
                    for part in qemu_opts(&v) {
                        match part.split_once('=') {
                            Some(("guest", n)) => id.name = clean(n),
                            None if id.name.is_none() => id.name = clean(&part),
                            _ => {}
                        }
                    }
                }
            }
            Some("uuid") => {
                id.uuid = value()
                    .filter(|u| is_uuid(u))
                    .map(|u| u.to_ascii_lowercase());
            }
            _ => {}
        }
        i += 1;
    }
    id
}

fn is_uuid(u: &str) -> bool {
    u.len() == 36
        && u.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// The libvirt domain in a `/proc/<pid>/cgroup`: systemd's scope
/// `machine-qemu\x2dN\x2dNAME.scope` (`\x2d` is `-`).
pub fn libvirt_domain(cgroup: &str) -> Option<String> {
    let scope = cgroup
        .split(['/', '\n'])
        .find_map(|s| s.strip_prefix("machine-qemu")?.strip_suffix(".scope"))?;
    let unescaped = unescape_systemd(scope);
    let rest = unescaped.strip_prefix('-')?;
    // N-NAME: the domain id, then the (possibly truncated) name.
    let (id, name) = rest.split_once('-')?;
    id.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
    clean(name)
}

fn unescape_systemd(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && b.get(i + 1) == Some(&b'x')
            && let Some(h) = s.get(i + 2..i + 4)
            && let Ok(v) = u8::from_str_radix(h, 16)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The most of a `/proc/<pid>` file read.
const PROC_MAX: u64 = 64 << 10;

fn read_proc(pid: i32, file: &str) -> Option<Vec<u8>> {
    use std::io::Read as _;
    let mut buf = Vec::new();
    std::fs::File::open(format!("/proc/{pid}/{file}"))
        .ok()?
        .take(PROC_MAX)
        .read_to_end(&mut buf)
        .ok()?;
    Some(buf)
}

/// Reads the VM's names from `/proc/<pid>`; `None` when the process is
/// gone, unreadable, or names nothing.
pub fn read(pid: i32) -> Option<VmIdentity> {
    if pid <= 0 {
        return None;
    }
    let mut id = from_cmdline(&read_proc(pid, "cmdline")?);
    id.libvirt_domain =
        read_proc(pid, "cgroup").and_then(|c| libvirt_domain(&String::from_utf8_lossy(&c)));
    (!id.is_empty()).then_some(id)
}

/// The names of the VMMs seen, looked up once per pid.
#[derive(Debug, Default)]
pub struct VmNames {
    known: HashMap<i32, Option<VmIdentity>>,
    /// Look pids up in `/proc` (live; a replayed pid is long gone).
    live: bool,
}

/// Pids remembered at most; beyond it the map starts over (a pid seen
/// again is read again).
const PIDS_MAX: usize = 16_384;

impl VmNames {
    /// Names looked up in `/proc` as pids are first seen.
    pub fn live() -> Self {
        Self {
            known: HashMap::default(),
            live: true,
        }
    }

    /// Looks `pid` up the first time it is seen (live only); returns what
    /// is new to record.
    pub fn observe(&mut self, pid: i32, ts_ns: u64) -> Option<VmRecord> {
        if !self.live || self.known.contains_key(&pid) {
            return None;
        }
        if self.known.len() >= PIDS_MAX {
            self.known.clear();
        }
        let id = read(pid);
        self.known.insert(pid, id.clone());
        id.map(|identity| VmRecord {
            ts_ns,
            userspace_pid: pid,
            identity,
        })
    }

    /// Remembers a recorded identity (replay).
    pub fn insert(&mut self, rec: &VmRecord) {
        if self.known.len() >= PIDS_MAX {
            self.known.clear();
        }
        self.known
            .insert(rec.userspace_pid, Some(rec.identity.clone()));
    }

    pub fn get(&self, pid: Option<i32>) -> Option<&VmIdentity> {
        self.known.get(&pid?)?.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(args: &[&str]) -> Vec<u8> {
        args.join("\0").into_bytes()
    }

    #[test]
    fn qemu_and_libvirt_command_lines() {
        // As libvirt starts QEMU.
        let id = from_cmdline(&cmd(&[
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "guest=td-guest-7,,a,debug-threads=on",
            "-uuid",
            "6B29FC40-CA47-1067-B31D-00DD010662DA",
            "-machine",
            "q35",
        ]));
        assert_eq!(id.name.as_deref(), Some("td-guest-7,a"));
        assert_eq!(
            id.uuid.as_deref(),
            Some("6b29fc40-ca47-1067-b31d-00dd010662da")
        );
        // By hand.
        let id = from_cmdline(&cmd(&["qemu", "--name=web1", "-uuid", "not-a-uuid"]));
        assert_eq!(id.name.as_deref(), Some("web1"));
        assert_eq!(id.uuid, None);
        assert!(from_cmdline(&cmd(&["firecracker", "--api-sock", "x"])).is_empty());
        // A hostile name: no control characters, bounded.
        let long = format!("guest=a\x1b[31m{}", "x".repeat(500));
        let id = from_cmdline(&cmd(&["qemu", "-name", &long]));
        let n = id.name.unwrap();
        assert!(!n.contains('\x1b') && n.chars().count() == NAME_MAX, "{n}");
    }

    #[test]
    fn libvirt_domain_from_the_scope() {
        let cg = "0::/machine.slice/machine-qemu\\x2d3\\x2dtd\\x2dguest.scope/libvirt/emulator\n";
        assert_eq!(libvirt_domain(cg).as_deref(), Some("td-guest"));
        assert_eq!(libvirt_domain("0::/user.slice/session-1.scope\n"), None);
    }

    #[test]
    fn vm_records_round_trip() {
        let r = VmRecord {
            ts_ns: 5,
            userspace_pid: 42,
            identity: VmIdentity {
                name: Some("a".into()),
                uuid: None,
                libvirt_domain: None,
            },
        };
        let line = r.to_json_record();
        assert!(line.contains("\"record\":\"vm\""), "{line}");
        match crate::log::reader::parse(&line).unwrap() {
            crate::log::reader::Record::Vm(back) => assert_eq!(*back, r),
            _ => panic!("{line}"),
        }
    }

    #[test]
    fn this_process_reads_as_no_vm() {
        // The test binary has no -name: nothing to record.
        assert_eq!(read(std::process::id() as i32), None);
        assert_eq!(read(-1), None);
    }
}
