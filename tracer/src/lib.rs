//! The tracer's library: kernel inspection and the attach plan, the eBPF
//! loader, the live loop of `watch` and `run` (`daemon`), metrics, alerts and `top`, over the pure
//! core (`tracer-core`: events, detector, model, event log, replay), whose
//! modules it re-exports under the same names. The `tracer` binary is a
//! thin CLI over it; tests use it directly.

// Every dependency is used by the library, but env_logger, which only the
// binary's main sets up.
#![cfg_attr(not(test), warn(unused_crate_dependencies))]
#[cfg(not(test))]
use env_logger as _;

pub use tracer_core::{
    config, detector, event, event_json, hexfmt, human, log, model, replay, vmid,
};

pub mod alerts;
pub mod daemon;
pub mod doctor;
pub mod kernel;
pub mod live;
pub mod loader;
pub mod manual;
pub mod metrics;
pub mod pipeline;
pub mod reload;
mod sys_bpf;
pub mod top;
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

pub use tracer_core::{EXIT_ERROR, EXIT_UNSUPPORTED, Failure};
