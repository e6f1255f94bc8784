//! `tracer`: watch KVM's MMU root lifecycle with eBPF.
//!
//! Exit codes (the contract scripts rely on):
//! - 0: success;
//! - 2: usage error (bad flags) or runtime error;
//! - 3: unsupported environment (not root, no BTF, no KVM), with what is
//!   missing.

use std::{process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use tracer::{Failure, doctor, watch};

#[derive(Parser)]
#[command(
    name = "tracer",
    version,
    about = "Trace KVM MMU root lifecycles with eBPF and catch vCPUs running with an invalid TDX mirror root",
    after_help = "Exit codes: 0 ok; 1 findings (replay); 2 usage or runtime error; \
                  3 unsupported environment (not root, no BTF, no KVM)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect this kernel and print the attach plan: probes, attach kinds,
    /// struct offsets, and which features are on or off and why. Loads
    /// nothing.
    Doctor(DoctorArgs),
    /// Attach the probes and stream root events until Ctrl-C or --duration,
    /// then detach and print a summary with drop counts (needs root).
    Watch(WatchArgs),
    /// Run the detector over recorded events (JSON lines from `watch
    /// --json` or `simulate`; files, or `-` for stdin) and print the
    /// findings. Exits 1 when there are findings, 0 when there are none.
    Replay(ReplayArgs),
    /// Generate the events of a model of KVM's root lifecycle, with a
    /// chosen kernel behaviour, as JSON lines on stdout. Pipe them into
    /// `tracer replay -` to see what the detector finds, or into your alert
    /// routing, without a TDX host.
    Simulate(SimulateArgs),
}

#[derive(Args)]
struct ReplayArgs {
    /// Event logs to read, in order; `-` (the default) is stdin.
    #[arg(value_name = "FILE")]
    inputs: Vec<std::path::PathBuf>,
    /// Print findings as JSON lines.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SimulateArgs {
    /// The kernel behaviour to model.
    #[arg(long, value_enum, default_value = "mainline")]
    kernel: tracer::model::Behaviour,
    /// The workload.
    #[arg(long, value_enum, default_value = "steady")]
    scenario: tracer::model::Scenario,
    /// vCPUs per VM.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=4096))]
    vcpus: u16,
    /// Rounds of the workload.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    rounds: u32,
    /// Seed: the same seed gives the same events.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
struct DoctorArgs {
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
    /// Also load every eBPF program, without attaching it, so this kernel's
    /// verifier checks each one (needs root).
    #[arg(long)]
    verify: bool,
    /// Inspect the kernel files below this directory instead of `/` (for
    /// captured kernels; see tracer/tests/data/kernels).
    #[arg(long, value_name = "DIR", hide = true)]
    root: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct WatchArgs {
    /// Print events as JSON lines instead of readable lines.
    #[arg(long)]
    json: bool,
    /// Stop after this long, e.g. 30s, 500ms, 5m.
    #[arg(long, value_name = "TIME", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Size of the event ring buffer in bytes: a power of two, at least 4096.
    #[arg(long, value_name = "BYTES", default_value = "4194304", value_parser = parse_ringbuf)]
    ringbuf_size: u32,
    /// Don't report each vCPU's first guest entry with new roots; the
    /// kvm_entry gate then only reports the forbidden TDX state.
    #[arg(long)]
    no_entry_transitions: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 500ms or 5m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {s:?}; use ms, s, m or h")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("{s:?} must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_ringbuf(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two of at least 4096"));
    }
    Ok(n)
}

fn main() -> ExitCode {
    let launched = std::time::Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Doctor(args) => doctor::run(args.root.as_deref(), args.json, args.verify),
        Command::Replay(args) => match tracer::replay::run(&args.inputs, args.json) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Command::Simulate(args) => {
            simulate(&args);
            Ok(())
        }
        Command::Watch(args) => watch::run(&watch::WatchOptions {
            launched,
            json: args.json,
            duration: args.duration,
            ringbuf_bytes: args.ringbuf_size,
            entry_transitions: !args.no_entry_transitions,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, error }) => {
            eprintln!("tracer: error: {error:#}");
            ExitCode::from(code)
        }
    }
}

fn simulate(args: &SimulateArgs) {
    use std::io::Write as _;
    let mut model = tracer::model::Model::new(args.kernel, args.seed);
    tracer::model::run_scenario(
        &mut model,
        args.scenario,
        usize::from(args.vcpus),
        args.rounds as usize,
    );
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for ev in model.take_events() {
        if writeln!(out, "{}", ev.to_json_record()).is_err() {
            // stdout closed (e.g. `| head`): nothing more to do.
            return;
        }
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_mins(2)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn ringbuf_size_must_be_power_of_two() {
        assert_eq!(parse_ringbuf("4096"), Ok(4096));
        assert!(parse_ringbuf("4095").is_err());
        assert!(parse_ringbuf("6000").is_err());
        assert!(parse_ringbuf("2048").is_err());
    }
}
