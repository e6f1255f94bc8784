//! The tracer's pure core: what a root event is and how it is decoded, the
//! detector that turns events into findings, the model of KVM's root
//! lifecycle, the event log (writer, reader, the recorder thread) and
//! replay, how events and findings are shown to a person, and the
//! daemon's configuration file.
//!
//! No eBPF, no async runtime, no build script: its tests and the fuzz
//! targets build with stable Rust alone. The `tracer` crate (probes,
//! loader, daemon, CLI) re-exports these modules under the same names.

#![cfg_attr(not(test), warn(unused_crate_dependencies))]

pub mod config;
pub mod detector;
pub mod event;
pub mod event_json;
pub mod hexfmt;
pub mod human;
pub mod log;
pub mod model;
pub mod replay;
pub mod time;
pub mod vmid;

/// Exit code for a usage or runtime error.
pub const EXIT_ERROR: u8 = 2;
/// Exit code for an environment the tracer can't run in.
pub const EXIT_UNSUPPORTED: u8 = 3;

/// An error with the exit code it maps to.
#[derive(Debug)]
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
