//! The durable event log: JSON Lines segments with a header record first,
//! rotated by size and age, compressed with zstd once closed, pruned by
//! count, total size and free disk space; and the reader that replays them.
//! The schema is documented in docs/event-log.md.

pub mod pipelined;
pub mod reader;
pub mod segments;
pub mod sink;
pub mod writer;

use serde::{Deserialize, Serialize};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Segment file names: `events-<UTC time>-<seq>.jsonl`, `.zst` once
/// compressed. They sort in time order.
pub const SEGMENT_PREFIX: &str = "events-";

/// `CLOCK_MONOTONIC` and `CLOCK_REALTIME`, read together: event timestamps
/// are monotonic; `realtime_ns - monotonic_ns` turns them into dates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockPair {
    pub monotonic_ns: u64,
    pub realtime_ns: u64,
}

impl ClockPair {
    pub fn now() -> Self {
        Self {
            monotonic_ns: clock_ns(libc::CLOCK_MONOTONIC),
            realtime_ns: clock_ns(libc::CLOCK_REALTIME),
        }
    }

    /// Wall-clock nanoseconds since the epoch of monotonic time `mono_ns`.
    pub fn to_realtime(self, mono_ns: u64) -> u64 {
        (i128::from(self.realtime_ns) - i128::from(self.monotonic_ns) + i128::from(mono_ns)) as u64
    }
}

/// This machine's hostname (the log header's, the alerts' `host` label,
/// `top`'s title), or "" when it can't be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// Nanoseconds of `clock`.
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass; both clocks used
    // here always exist on Linux.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One attached (or not) probe, as the header records the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanEntry {
    pub program: String,
    pub target: String,
    pub attach: String,
}

/// The first record of every segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub schema: u32,
    pub tool_version: String,
    pub kernel_release: String,
    pub hostname: String,
    pub boot_id: String,
    pub command_line: Vec<String>,
    /// `live` for recorded kernels, `model:<behaviour>` for simulations.
    pub source: String,
    pub attach_plan: Vec<PlanEntry>,
    pub clock: ClockPair,
    /// Segment number within this recording, from 0.
    pub segment: u64,
    /// Identifies one recording (one daemon run) on this boot: segments
    /// with the same value continue each other. Absent in older logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<String>,
}

impl Header {
    /// A header for this host and process.
    pub fn for_this_host(source: String, kernel_release: String, plan: Vec<PlanEntry>) -> Self {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        Self {
            schema: SCHEMA_VERSION,
            tool_version: env!("CARGO_PKG_VERSION").to_owned(),
            kernel_release,
            hostname: hostname(),
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            command_line: std::env::args().collect(),
            source,
            attach_plan: plan,
            clock: ClockPair::now(),
            segment: 0,
            recording: Some(format!(
                "{}-{}",
                std::process::id(),
                ClockPair::now().realtime_ns
            )),
        }
    }
}

/// Events a probe lost (ring buffer full) in an interval: a gap in the log
/// is visible as a gap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loss {
    /// The eBPF program, or `recorder` for records the writer dropped.
    pub probe: String,
    /// Monotonic bounds of the interval the losses happened in.
    pub from_ns: u64,
    pub to_ns: u64,
    pub lost: u64,
    pub reason: String,
}

impl Loss {
    /// `{"record":"loss", …}` (no trailing newline).
    pub fn to_json_record(&self) -> String {
        let body = serde_json::to_string(self).expect("losses always serialize");
        format!("{{\"record\":\"loss\",{}", &body[1..])
    }
}

impl Header {
    /// `{"record":"header", …}` (no trailing newline).
    pub fn to_json_record(&self) -> String {
        let body = serde_json::to_string(self).expect("headers always serialize");
        format!("{{\"record\":\"header\",{}", &body[1..])
    }
}
