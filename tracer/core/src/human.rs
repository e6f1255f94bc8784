//! Output for a person: one notion of time (wall clock, local or UTC,
//! through the log's clock pair; `--mono` for raw monotonic seconds),
//! aligned columns under a header, a compact default with `--wide` for
//! every field, and colour on a terminal (`--color`, `NO_COLOR`).

use std::fmt::Write as _;

use common::{INVALID_PAGE, KVM_X86_TDX_VM};

use crate::{
    detector::{Finding, Severity},
    event::{Event, Kind, hpa, vm_type_name},
    log::ClockPair,
};

/// How times are shown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TimeStyle {
    /// Wall clock in the local time zone (the default).
    #[default]
    Local,
    /// Wall clock in UTC, RFC 3339.
    Utc,
    /// Monotonic seconds since boot, as the kernel stamps events.
    Mono,
}

/// `--color auto|always|never`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// On a terminal, unless `NO_COLOR` is set.
    #[default]
    Auto,
    Always,
    Never,
}

impl ColorChoice {
    /// Whether to colour stdout.
    pub fn enabled(self) -> bool {
        use std::io::IsTerminal as _;
        match self {
            Self::Always => true,
            Self::Never => false,
            Self::Auto => {
                std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                    && std::io::stdout().is_terminal()
            }
        }
    }
}

/// How a person sees events and findings.
#[derive(Clone, Copy, Debug, Default)]
pub struct Style {
    pub time: TimeStyle,
    pub wide: bool,
    pub color: bool,
}

const RED: &str = "\x1b[31m";
const BOLD_RED: &str = "\x1b[1;31m";
const YELLOW: &str = "\x1b[33m";
const CYAN: &str = "\x1b[36m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

impl Style {
    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("{code}{text}{RESET}")
        } else {
            text.to_owned()
        }
    }

    /// A time: wall clock when the clock pair is known (else monotonic).
    pub fn time(self, ts_ns: u64, clock: Option<ClockPair>) -> String {
        match (self.time, clock) {
            (TimeStyle::Mono, _) | (_, None) => {
                format!(
                    "{}.{:06}",
                    ts_ns / 1_000_000_000,
                    (ts_ns % 1_000_000_000) / 1000
                )
            }
            (TimeStyle::Utc, Some(c)) => crate::log::writer::utc_rfc3339(c.to_realtime(ts_ns)),
            (TimeStyle::Local, Some(c)) => local_time(c.to_realtime(ts_ns)),
        }
    }

    /// The column header of [`Style::event_row`].
    pub fn header(self) -> String {
        let time = match self.time {
            TimeStyle::Mono => format!("{:>13}", "TIME(s)"),
            TimeStyle::Utc => format!("{:<27}", "TIME (UTC)"),
            TimeStyle::Local => format!("{:<26}", "TIME"),
        };
        let mut s = format!(
            "{time} {:<4} {:<16} {:>7} {:<7} {:>4} {:<18} {:<18} {:>3}",
            "CPU", "EVENT", "VMM", "TYPE", "VCPU", "ROOT", "MIRROR", "GEN"
        );
        if self.wide {
            s.push_str("  DETAIL");
        }
        self.paint(DIM, &s)
    }

    /// One event as aligned columns. Compact: time, CPU, event, VMM pid,
    /// VM type, vCPU, roots and generation, and the return code when it is
    /// an error; `--wide` adds the task, the `kvm` pointer, roles, the
    /// memslot generation, arguments and return values. A VM type with no
    /// mirror root shows `-` for it, not an alarming `INVALID`.
    pub fn event_row(self, ev: &Event, clock: Option<ClockPair>) -> String {
        let time = self.time(ev.ts_ns, clock);
        let time = match self.time {
            TimeStyle::Mono => format!("{time:>13}"),
            TimeStyle::Utc => format!("{time:<27}"),
            TimeStyle::Local => format!("{time:<26}"),
        };
        let tdx = ev.vm_type == Some(KVM_X86_TDX_VM);
        let mirror = match ev.mirror_root_hpa {
            _ if ev.mirror_stale == Some(true) => "STALE".to_owned(),
            Some(v) if tdx => hpa(v),
            Some(v) if v != INVALID_PAGE => hpa(v),
            _ => "-".to_owned(),
        };
        let forbidden = tdx
            && ev.root_hpa.is_some_and(|r| r != INVALID_PAGE)
            && (mirror == "INVALID" || mirror == "STALE");
        let mirror = format!("{mirror:<18}");
        let mirror = if forbidden {
            self.paint(BOLD_RED, &mirror)
        } else {
            mirror
        };
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let mut s = format!(
            "{time} {:<4} {:<16} {:>7} {:<7} {:>4} {:<18} {mirror} {:>3}",
            format!("{}", ev.cpu),
            ev.kind.name(),
            opt(ev.userspace_pid.map(|p| p.to_string())),
            ev.vm_type.map_or("-", vm_type_name),
            opt(ev.vcpu_id.map(|v| v.to_string())),
            opt(ev.root_hpa.map(hpa)),
            opt(ev.mmu_valid_gen.map(|g| g.to_string())),
        );
        let mut detail = String::new();
        if self.wide {
            let _ = write!(detail, " {}[{}/{}]", ev.comm, ev.pid, ev.tid);
            if let Some(k) = ev.kvm {
                let _ = write!(detail, " kvm={k:#x}");
            }
            if let Some(v) = ev.root_role {
                let _ = write!(detail, " role={v:#x}");
            }
            if let Some(v) = ev.mirror_role {
                let _ = write!(detail, " mirror_role={v:#x}");
            }
            if let Some(v) = ev.memslots_gen {
                let _ = write!(detail, " slots_gen={v}");
            }
        }
        // What an event's kind turns on: always shown.
        if let Some(v) = ev.arg {
            let name = match ev.kind {
                Kind::AllocRoot => "mirror",
                Kind::InvalidateRoots => "root_types",
                _ => "arg",
            };
            let _ = write!(detail, " {name}={v:#x}");
        }
        if let Some(v) = ev.before_hpa {
            let _ = write!(detail, " before={}", hpa(v));
        }
        if let Some(v) = ev.ret.filter(|&r| self.wide || r < 0) {
            let _ = write!(detail, " ret={v}");
        }
        if !detail.is_empty() {
            s.push(' ');
            s.push_str(&detail);
        }
        s
    }

    /// A finding: the headline (severity coloured) with the wall time and
    /// the VM's names, the explanation, and the evidence rows.
    pub fn finding(self, f: &Finding, clock: Option<ClockPair>) -> String {
        let colour = match f.severity {
            Severity::Critical => BOLD_RED,
            Severity::Error => RED,
            Severity::Warning => YELLOW,
            Severity::Info => CYAN,
        };
        let mut head = format!(
            "FINDING {} {} at {}: vmm={}",
            f.severity.name().to_uppercase(),
            f.kind.name(),
            self.time(f.ts_ns, clock),
            f.userspace_pid
                .map_or_else(|| "?".into(), |p| p.to_string()),
        );
        if let Some(name) = f.vm.as_ref().and_then(|v| v.display_name()) {
            let _ = write!(head, " vm={name}");
        }
        if let Some(v) = f.vcpu_id {
            let _ = write!(head, " vcpu={v}");
        }
        if self.wide {
            let _ = write!(head, " kvm={:#x}", f.kvm);
        }
        let mut s = self.paint(colour, &head);
        s.push('\n');
        for line in crate::detector::wrap(&f.explanation, 96) {
            s.push_str("    ");
            s.push_str(&line);
            s.push('\n');
        }
        s.push_str("    evidence:\n");
        for ev in &f.evidence {
            s.push_str("      ");
            s.push_str(&self.event_row(ev, clock));
            s.push('\n');
        }
        s
    }
}

/// `2026-11-28 20:18:30.123456` in the local time zone (jiff's system
/// zone: `TZ`, else /etc/localtime, else UTC).
pub fn local_time(ns: u64) -> String {
    time_in(ns, jiff::tz::TimeZone::system())
}

fn time_in(ns: u64, zone: jiff::tz::TimeZone) -> String {
    let Ok(ts) = jiff::Timestamp::from_nanosecond(i128::from(ns)) else {
        return crate::log::writer::utc_rfc3339(ns);
    };
    ts.to_zoned(zone)
        .strftime("%Y-%m-%d %H:%M:%S%.6f")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_a_zone_keep_six_digits() {
        use jiff::tz::{Offset, TimeZone};
        let ns = 1_795_839_261_123_456_789;
        assert_eq!(time_in(ns, TimeZone::UTC), "2026-11-28 04:14:21.123456");
        let paris = TimeZone::fixed(Offset::constant(1));
        assert_eq!(time_in(ns, paris), "2026-11-28 05:14:21.123456");
        assert_eq!(
            time_in(1_795_839_261_000_000_000, TimeZone::UTC),
            "2026-11-28 04:14:21.000000"
        );
    }

    fn ev(vm_type: u8, mirror: u64) -> Event {
        let mut e: Event = serde_json::from_str(
            r#"{"ts_ns":1500000000,"kind":"run_exit","probe":"kvm_run_exit","cpu":1,"pid":7,"tid":8,"comm":"qemu"}"#,
        )
        .unwrap();
        e.vm_type = Some(vm_type);
        e.userspace_pid = Some(7);
        e.vcpu_id = Some(0);
        e.root_hpa = Some(0x4000);
        e.mirror_root_hpa = Some(mirror);
        e
    }

    #[test]
    fn compact_rows_align_under_the_header_and_hide_absent_mirrors() {
        let style = Style {
            time: TimeStyle::Mono,
            wide: false,
            color: false,
        };
        let header = style.header();
        let default = style.event_row(&ev(0, INVALID_PAGE), None);
        let tdx = style.event_row(&ev(5, INVALID_PAGE), None);
        assert!(!default.contains("INVALID"), "{default}");
        assert!(tdx.contains("INVALID"), "{tdx}");
        let col = |s: &str, w: &str| s.find(w).unwrap();
        assert_eq!(col(&header, "ROOT"), col(&default, "0x4000"));
        assert!(default.len() < 120, "{default}");
        let wide = Style {
            wide: true,
            ..style
        }
        .event_row(&ev(5, 0x5000), None);
        assert!(wide.contains("qemu[7/8]"), "{wide}");
    }

    #[test]
    fn time_styles() {
        let clock = ClockPair {
            monotonic_ns: 0,
            realtime_ns: 1_795_894_160_000_000_000,
        };
        let mono = Style {
            time: TimeStyle::Mono,
            ..Style::default()
        };
        assert_eq!(mono.time(1_500_000_000, Some(clock)), "1.500000");
        let utc = Style {
            time: TimeStyle::Utc,
            ..Style::default()
        };
        assert_eq!(
            utc.time(1_500_000_000, Some(clock)),
            crate::log::writer::utc_rfc3339(1_795_894_161_500_000_000)
        );
        // No clock pair: monotonic, whatever was asked.
        assert_eq!(utc.time(1_500_000_000, None), "1.500000");
        let painted = Style {
            color: true,
            ..Style::default()
        }
        .paint(RED, "x");
        assert_eq!(painted, "\x1b[31mx\x1b[0m");
    }
}
