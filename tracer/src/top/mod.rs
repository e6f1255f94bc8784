//! `tracer top`: a full-screen live view of VMs, vCPUs and root health, from
//! the probes or from a recorded log (`--replay`, at adjustable speed).
//!
//! One thread, no runtime: each frame drains the ring buffer (or advances
//! the replay clock), redraws, and waits for a key at most one frame. The
//! terminal is restored on every exit, panics and SIGTERM included.

pub mod keys;
mod replay;
pub mod state;
pub mod ui;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::anyhow;
use aya::maps::{MapData, RingBuf};

use crate::{
    Failure,
    kernel::{self, PlanOptions},
    loader::Session,
    log::{ClockPair, PlanEntry},
};
use replay::Replay;
use state::{Action, TopState};

/// How often the screen is redrawn (and the ring buffer drained).
const FRAME: Duration = Duration::from_millis(200);
pub struct TopOptions {
    /// Recorded logs to replay; empty: attach to this kernel.
    pub replay: Vec<PathBuf>,
    /// Replay speed: log seconds per wall second.
    pub speed: f64,
    pub ringbuf_bytes: u32,
    /// With `replay`: print the screen of this size (columns, rows) at the
    /// log's end as text, without a terminal.
    pub snapshot: Option<(u16, u16)>,
}

static QUIT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    QUIT.store(true, Ordering::Relaxed);
}

fn catch_signals() {
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn run(opts: &TopOptions) -> Result<(), Failure> {
    let need_terminal = || -> Result<(), Failure> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(1) } == 0 {
            return Err(anyhow!(
                "tracer top draws a full-screen view and needs a terminal on stdout; for a \
                 stream use `tracer watch --json` or `tracer replay`"
            )
            .into());
        }
        Ok(())
    };
    // Bad input is reported before the terminal check, and the terminal
    // before anything attaches.
    if let Some((w, h)) = opts.snapshot {
        let replay = Replay::load(opts)?;
        print!("{}", snapshot(replay, w, h)?);
        return Ok(());
    }
    let mut source = if opts.replay.is_empty() {
        need_terminal()?;
        Source::Live(Box::new(Live::start(opts)?))
    } else {
        let replay = Replay::load(opts)?;
        need_terminal()?;
        Source::Replay(Box::new(replay))
    };
    let mut state = source.state();
    catch_signals();
    // Installs a panic hook that restores the terminal first.
    let mut terminal = ratatui::init();
    watchdog();
    let result = ui_loop(&mut terminal, &mut source, &mut state);
    ratatui::restore();
    result.map_err(Failure::from)
}

fn ui_loop(
    terminal: &mut ratatui::DefaultTerminal,
    source: &mut Source,
    state: &mut TopState,
) -> anyhow::Result<()> {
    let mut last_tick = Instant::now();
    source.pump(state);
    source.tick(state);
    while !QUIT.load(Ordering::Relaxed) {
        source.pump(state);
        if last_tick.elapsed() >= Duration::from_secs(1) {
            source.tick(state);
            last_tick = Instant::now();
        }
        terminal.draw(|f| ui::draw(f, state))?;
        // Keys are read here, level-triggered, not through crossterm's
        // reader: that one spins forever on a terminal that hung up and can
        // miss a key that arrives with a resize. Resizes need no event:
        // every draw fits the current size.
        let bytes = match keys::wait(input_fd(), FRAME) {
            keys::Input::Idle => continue,
            keys::Input::HungUp => return Ok(()),
            keys::Input::Bytes(b) => b,
        };
        for k in keys::parse(&bytes) {
            match state.key(k) {
                Action::Quit => return Ok(()),
                Action::TogglePause => source.toggle_pause(state),
                Action::Faster => source.scale_speed(state, 2.0),
                Action::Slower => source.scale_speed(state, 0.5),
                Action::None => {}
            }
        }
    }
    Ok(())
}

/// Plays the whole log on its own clock, ticking the rates once per wall
/// second of the replay speed (as the live loop does) and at the log's last
/// event, and renders that frame as text: the same screen on any machine.
fn snapshot(mut replay: Replay, w: u16, h: u16) -> anyhow::Result<String> {
    let mut state = replay.state();
    replay.paused = true;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "the speed is clamped to at most 2^20: a tick of at most 2^20 s"
    )]
    let tick_ns = (replay.speed * 1e9) as u64;
    let mut next_tick = replay.first_ns;
    let mut last_ns = replay.first_ns;
    while let Some(ev) = replay.next_event_blocking() {
        last_ns = last_ns.max(ev.ts_ns);
        while ev.ts_ns >= next_tick {
            state.tick(next_tick);
            next_tick = next_tick.saturating_add(tick_ns);
        }
        for v in replay.names.drain(..) {
            state.names.insert(&v);
        }
        state.event(&ev);
        replay.fed += 1;
    }
    // The last rates are over the time since the last tick, ending at the
    // log's last event.
    state.tick(last_ns);
    state.drops = replay.lost;
    if let Some(end) = &replay.end {
        state.status.clone_from(end);
    }
    let mut term = ratatui::Terminal::new(ratatui::backend::TestBackend::new(w, h))?;
    term.draw(|f| ui::draw(f, &state))?;
    let buf = term.backend().buffer();
    let mut out = String::new();
    for row in buf.content().chunks(usize::from(w)) {
        let line: String = row.iter().map(ratatui::buffer::Cell::symbol).collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// The terminal keys come from: stdin when it is one, else /dev/tty
/// (opened once, kept open).
fn input_fd() -> libc::c_int {
    static FD: std::sync::OnceLock<libc::c_int> = std::sync::OnceLock::new();
    *FD.get_or_init(|| {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(0) } == 1 {
            return 0;
        }
        std::fs::File::open("/dev/tty").map_or(-1, std::os::fd::IntoRawFd::into_raw_fd)
    })
}

/// Last resort: if the terminal hangs up, or a SIGTERM/SIGHUP is not
/// honoured within a second (the main thread stuck writing to the
/// terminal), restore what can be restored and exit.
fn watchdog() {
    std::thread::spawn(|| {
        let mut quit_seen: Option<Instant> = None;
        loop {
            std::thread::sleep(Duration::from_millis(250));
            let mut p = libc::pollfd {
                fd: input_fd(),
                events: 0,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let hung_up = unsafe { libc::poll(&raw mut p, 1, 0) } > 0
                && p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0;
            if QUIT.load(Ordering::Relaxed) {
                quit_seen.get_or_insert_with(Instant::now);
            }
            let stuck = quit_seen.is_some_and(|t| t.elapsed() > Duration::from_secs(1));
            if hung_up || stuck {
                // Give the main thread a moment to leave on its own.
                std::thread::sleep(Duration::from_millis(500));
                ratatui::restore();
                std::process::exit(0);
            }
        }
    });
}

enum Source {
    Live(Box<Live>),
    Replay(Box<Replay>),
}

impl Source {
    fn state(&self) -> TopState {
        match self {
            Self::Live(l) => l.state(),
            Self::Replay(r) => r.state(),
        }
    }

    fn pump(&mut self, s: &mut TopState) {
        match self {
            Self::Live(l) => l.pump(s),
            Self::Replay(r) => r.pump(s),
        }
    }

    fn tick(&mut self, s: &mut TopState) {
        match self {
            Self::Live(l) => l.tick(s),
            Self::Replay(r) => s.tick(r.position_ns()),
        }
    }

    fn toggle_pause(&mut self, s: &mut TopState) {
        if let Self::Replay(r) = self {
            r.advance();
            r.paused = !r.paused;
            s.paused = r.paused;
        }
    }

    fn scale_speed(&mut self, s: &mut TopState, by: f64) {
        if let Self::Replay(r) = self {
            r.advance();
            r.speed = (r.speed * by).clamp(MIN_SPEED, MAX_SPEED);
            s.speed = Some(r.speed);
        }
    }
}

pub const MIN_SPEED: f64 = 0.125;
pub const MAX_SPEED: f64 = 1_048_576.0;

/// Attached to this kernel.
struct Live {
    session: Session,
    events: RingBuf<MapData>,
    kernel: String,
    plan_summary: String,
    decode_errors: u64,
}

impl Live {
    fn start(opts: &TopOptions) -> Result<Self, Failure> {
        crate::live::require_capabilities(
            "tracer top",
            "load eBPF programs; `tracer top --replay LOG` works without them",
        )?;
        let plan = crate::live::plan(
            &crate::live::kernel_root(),
            PlanOptions {
                entry_transitions: true,
                entry_gate_btf: true,
                wakeup_bytes: crate::config::Config::default().probes.wakeup_bytes,
            },
        )
        .map_err(crate::doctor::kernel_failure)?;
        crate::live::require_probes(&plan)?;
        let mut session = Session::start(&plan, opts.ringbuf_bytes, false)?;
        let events = session.take_events()?;
        let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
        for (_, kind, _) in &session.attached {
            *by_kind.entry(kind.to_string()).or_default() += 1;
        }
        let off = plan
            .probes
            .iter()
            .filter(|p| p.attach == kernel::AttachKind::Off)
            .count();
        let plan_summary = format!(
            "{} probe(s) attached ({}), {off} off, {} failed; `tracer doctor` explains",
            session.attached.len(),
            by_kind
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect::<Vec<_>>()
                .join(", "),
            session.failures.len()
        );
        Ok(Self {
            session,
            events,
            kernel: plan.kernel_release,
            plan_summary,
            decode_errors: 0,
        })
    }

    fn state(&self) -> TopState {
        let mut s = TopState::new(
            crate::log::hostname(),
            self.kernel.clone(),
            "live".into(),
            self.plan_summary.clone(),
        );
        s.names = crate::vmid::VmNames::live();
        s
    }

    fn pump(&mut self, s: &mut TopState) {
        self.decode_errors += crate::live::drain(&mut self.events, |ev| s.event(ev));
    }

    fn tick(&mut self, s: &mut TopState) {
        if let Ok(c) = self.session.counters() {
            s.drops = c.reserve_failed() + self.decode_errors;
        }
        s.tick(ClockPair::now().monotonic_ns);
    }
}

/// "12 probe(s): 9 kprobe, 3 raw-tracepoint, 2 off" from a log header.
pub fn summarize_plan(plan: &[PlanEntry]) -> String {
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for p in plan {
        *by_kind.entry(p.attach.as_str()).or_default() += 1;
    }
    format!(
        "{} probe(s) as recorded: {}",
        plan.len(),
        by_kind
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}
