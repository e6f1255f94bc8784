//! The tracer's library: kernel inspection and the attach plan, the eBPF
//! loader, event decoding, and the `doctor` and `watch` commands. The
//! `tracer` binary is a thin CLI over it; tests use it directly.

pub mod alerts;
pub mod config;
pub mod detector;
pub mod doctor;
pub mod event;
pub mod event_json;
pub mod hexfmt;
pub mod human;
pub mod kernel;
pub mod loader;
pub mod log;
pub mod manual;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod reload;
pub mod replay;
#[cfg(feature = "top")]
pub mod top;
pub mod vmid;
pub mod watch;
pub mod web;

/// The tracer's version, the git revision it was built from, and the build
/// date: `tracer --version` and the `build_info` metric.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_REVISION: &str = env!("TRACER_GIT_REV");
pub const BUILD_DATE: &str = env!("TRACER_BUILD_DATE");
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("TRACER_GIT_REV"),
    ", built ",
    env!("TRACER_BUILD_DATE"),
    ")"
);

/// Exit code for a usage or runtime error.
pub const EXIT_ERROR: u8 = 2;
/// Exit code for an environment the tracer can't run in.
pub const EXIT_UNSUPPORTED: u8 = 3;

/// An error with the exit code it maps to.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn unsupported(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: EXIT_UNSUPPORTED,
            error: error.into(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self {
            code: EXIT_ERROR,
            error,
        }
    }
}
