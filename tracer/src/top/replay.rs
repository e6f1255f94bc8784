//! `tracer top --replay`: the log read on a thread ahead of the screen, then
//! fed to the state at the chosen speed (paused, faster, slower), ending with
//! the log's own end.

use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::mpsc::{self, Receiver, TryRecvError},
    time::Instant,
};

use anyhow::{Context as _, anyhow};

use super::{MAX_SPEED, MIN_SPEED, TopOptions, state::TopState, summarize_plan};
use crate::{
    Failure,
    event::Event,
    log::{
        Header,
        reader::{self, ReadStats},
    },
    replay::{REORDER_WINDOW_NS, Read, Step, read_ordered},
};

/// Events a replay feeds per frame at most, so keys stay responsive.
pub(super) const REPLAY_BATCH: usize = 200_000;

/// What the reader thread hands the replay, in timestamp order (within
/// replay's reorder window).
pub(super) enum Fed {
    Header(Box<Header>),
    Event(Box<Event>),
    Lost(u64),
    Vm(Box<crate::vmid::VmRecord>),
    Done {
        events: u64,
        problems: u64,
        skipped: u64,
        first_problem: Option<String>,
    },
}

/// Records read ahead of the play position at most: the log streams, so a
/// replay takes the same memory whatever the log's length.
pub(super) const READ_AHEAD: usize = 4096;

/// Reads `files` on a thread of its own, as `tracer replay` orders them.
pub(super) fn spawn_reader(files: Vec<PathBuf>) -> std::io::Result<Receiver<Fed>> {
    let (tx, rx) = mpsc::sync_channel(READ_AHEAD);
    std::thread::Builder::new()
        .name("replay-reader".into())
        .spawn(move || {
            let mut stats = ReadStats::default();
            let mut events = 0u64;
            let mut header_sent = false;
            read_ordered(&files, &mut stats, REORDER_WINDOW_NS, |read| match read {
                Read::Header(h) if !header_sent => {
                    header_sent = true;
                    let _ = tx.send(Fed::Header(Box::new(h.clone())));
                }
                Read::Lost(n) => {
                    let _ = tx.send(Fed::Lost(n));
                }
                Read::Vm(v) => {
                    let _ = tx.send(Fed::Vm(v));
                }
                Read::Step(Step::Event(ev, _)) => {
                    events += 1;
                    let _ = tx.send(Fed::Event(Box::new(ev.clone())));
                }
                _ => {}
            });
            let _ = tx.send(Fed::Done {
                events,
                problems: stats.problems.len() as u64 + stats.problems_not_kept,
                skipped: stats.skipped_lines,
                first_problem: stats.problems.first().map(ToString::to_string),
            });
        })?;
    Ok(rx)
}

/// A recorded log played back on its own clock, streamed: read ahead by a
/// bounded queue, never loaded whole.
pub(super) struct Replay {
    pub(super) rx: Receiver<Fed>,
    /// The next event, once its time has not come yet.
    pub(super) pending: Option<Event>,
    pub(super) fed: u64,
    /// How the log ended, once it has: the status line.
    pub(super) end: Option<String>,
    pub(super) lost: u64,
    /// `vm` records read, for the state before the next event.
    pub(super) names: Vec<crate::vmid::VmRecord>,
    pub(super) first_ns: u64,
    /// Log nanoseconds played so far.
    pub(super) played_ns: f64,
    pub(super) last_wall: Instant,
    pub(super) speed: f64,
    pub(super) paused: bool,
    pub(super) host: String,
    pub(super) kernel: String,
    pub(super) source: String,
    pub(super) plan_summary: String,
}

impl Replay {
    pub(super) fn load(opts: &TopOptions) -> Result<Self, Failure> {
        let files = reader::expand_inputs(&opts.replay).map_err(|e| anyhow!("{e}"))?;
        let names = files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let rx = spawn_reader(files).context("starting the log reader")?;
        let mut header = None;
        let mut lost = 0;
        let mut vm_names = Vec::new();
        // The header and the first event, or why there are none.
        let first = loop {
            match rx.recv() {
                Ok(Fed::Header(h)) => header = Some(h),
                Ok(Fed::Lost(n)) => lost += n,
                Ok(Fed::Vm(v)) => vm_names.push(*v),
                Ok(Fed::Event(ev)) => break *ev,
                Ok(Fed::Done { first_problem, .. }) => {
                    let why = first_problem.map_or(String::new(), |p| format!(": {p}"));
                    return Err(anyhow!("no events in {names}{why}").into());
                }
                Err(_) => return Err(anyhow!("the log reader stopped").into()),
            }
        };
        let h = header.context("the log has no header record")?;
        let plan_summary = if h.attach_plan.is_empty() {
            format!("none recorded ({})", h.source)
        } else {
            summarize_plan(&h.attach_plan)
        };
        Ok(Self {
            rx,
            first_ns: first.ts_ns,
            pending: Some(first),
            fed: 0,
            end: None,
            lost,
            names: vm_names,
            played_ns: 0.0,
            last_wall: Instant::now(),
            speed: opts.speed.clamp(MIN_SPEED, MAX_SPEED),
            paused: false,
            host: h.hostname.clone(),
            kernel: h.kernel_release.clone(),
            source: format!(
                "replay of {} ({})",
                opts.replay
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                h.source
            ),
            plan_summary,
        })
    }

    pub(super) fn state(&self) -> TopState {
        let mut s = TopState::new(
            self.host.clone(),
            self.kernel.clone(),
            self.source.clone(),
            self.plan_summary.clone(),
        );
        s.speed = Some(self.speed);
        s
    }

    /// Moves the log clock on by the wall time since the last call.
    pub(super) fn advance(&mut self) {
        let now = Instant::now();
        if !self.paused {
            self.played_ns += now.duration_since(self.last_wall).as_secs_f64() * 1e9 * self.speed;
        }
        self.last_wall = now;
    }

    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a non-negative count of nanoseconds"
    )]
    pub(super) fn position_ns(&self) -> u64 {
        self.first_ns.saturating_add(self.played_ns as u64)
    }

    /// The next event the reader has, if it has one now.
    pub(super) fn next_event(&mut self) -> Option<Event> {
        self.next_from(Receiver::try_recv)
    }

    /// The next event, waiting for the reader; `None` at the log's end.
    pub(super) fn next_event_blocking(&mut self) -> Option<Event> {
        self.next_from(|rx| rx.recv().map_err(|_| TryRecvError::Disconnected))
    }

    /// The next event `recv` hands over, taking in what comes before it.
    pub(super) fn next_from(
        &mut self,
        recv: impl Fn(&Receiver<Fed>) -> Result<Fed, TryRecvError>,
    ) -> Option<Event> {
        if let Some(ev) = self.pending.take() {
            return Some(ev);
        }
        while self.end.is_none() {
            match recv(&self.rx) {
                Ok(Fed::Event(ev)) => return Some(*ev),
                Ok(Fed::Lost(n)) => self.lost += n,
                Ok(Fed::Vm(v)) => self.names.push(*v),
                Ok(Fed::Header(_)) => {}
                Ok(Fed::Done {
                    events,
                    problems,
                    skipped,
                    ..
                }) => {
                    let mut end = format!("end of log: {events} events");
                    if problems > 0 {
                        let _ = write!(
                            end,
                            "; {problems} problem(s) reading it, {skipped} line(s) skipped \
                             (`tracer replay` lists them)"
                        );
                    }
                    self.end = Some(end);
                }
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => {
                    self.end = Some(format!("end of log: {} events", self.fed));
                }
            }
        }
        None
    }

    pub(super) fn pump(&mut self, s: &mut TopState) {
        self.advance();
        let until = self.position_ns();
        let mut fed = 0;
        while fed < REPLAY_BATCH
            && let Some(ev) = self.next_event()
        {
            if ev.ts_ns > until && self.fed > 0 {
                self.pending = Some(ev);
                break;
            }
            for v in self.names.drain(..) {
                s.names.insert(&v);
            }
            s.event(&ev);
            self.fed += 1;
            fed += 1;
        }
        s.drops = self.lost;
        if let Some(end) = &self.end
            && self.pending.is_none()
        {
            s.status.clone_from(end);
        }
    }
}
