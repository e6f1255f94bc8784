//! Putting records in order: segments and stdin read as one stream, events
//! re-sorted within a bounded window (per-CPU ring buffers interleave), and
//! recordings told apart (a new boot, a restarted daemon).

use std::{cmp::Reverse, collections::BinaryHeap, path::PathBuf};

use crate::{
    detector::{Boundary, Finding},
    event::Event,
    log::{
        ClockPair, Header,
        reader::{ReadStats, Record},
    },
};

/// What [`read_ordered`] hands on.
pub enum Read<'a> {
    /// A header, as it is read (its boundary follows as a step).
    Header(&'a Header),
    /// A finding the live run recorded, as it is read, with the clock of
    /// the header in effect.
    Finding(Box<Finding>, Option<ClockPair>),
    /// A `loss` record's count, as it is read (its gap follows as a step).
    Lost(u64),
    /// A VMM's names, as they are read (before its events are judged).
    Vm(Box<crate::vmid::VmRecord>),
    /// The next event or boundary, in judging order.
    Step(Step<'a>),
}

/// Reads `files` and hands on what they hold, events and boundaries in the
/// order the detector judges them (see [`Sequencer`]); returns how many
/// events came too late to be put in order. `replay` and `top --replay`
/// both read through it.
pub fn read_ordered(
    files: &[PathBuf],
    stats: &mut ReadStats,
    window_ns: u64,
    mut on: impl FnMut(Read<'_>),
) -> u64 {
    let mut seq = Sequencer::new(window_ns);
    crate::log::pipelined::read_all_pipelined(files, stats, |record| match record {
        Record::Finding(f) => on(Read::Finding(f, seq.clock())),
        Record::Vm(v) => on(Read::Vm(v)),
        Record::Header(ref h) => {
            on(Read::Header(h));
            seq.push(record, &mut |s| on(Read::Step(s)));
        }
        Record::Loss(ref l) => {
            on(Read::Lost(l.lost));
            seq.push(record, &mut |s| on(Read::Step(s)));
        }
        other => seq.push(other, &mut |s| on(Read::Step(s))),
    });
    seq.finish(&mut |s| on(Read::Step(s)));
    seq.late
}

/// How far out of timestamp order events may arrive and still be judged in
/// order (merged captures, several inputs, per-CPU ring-buffer interleave).
pub const REORDER_WINDOW_NS: u64 = 5_000_000_000;

/// Events held for reordering at most; beyond it the oldest is judged.
pub(super) const REORDER_CAP: usize = 100_000;

/// What the sequencer hands the detector, in order.
pub enum Step<'a> {
    Event(&'a Event, Option<ClockPair>),
    Boundary(Boundary),
}

pub(super) enum Item {
    Event(Box<Event>),
    Gap,
}

/// One held item; ordered by (timestamp, arrival).
pub(super) struct Held {
    ts: u64,
    seq: u64,
    clock: Option<ClockPair>,
    item: Item,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.ts, self.seq) == (o.ts, o.seq)
    }
}

impl Eq for Held {}

impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Held {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.ts, self.seq).cmp(&(o.ts, o.seq))
    }
}

/// Puts log records into the order the detector judges them in: events by
/// timestamp within a bounded window, gaps (`loss` records, unreadable
/// lines) where they happened, and headers as boundaries: a new boot resets
/// the detector, a new recording on the same boot means vCPUs may be first
/// seen mid-run.
pub struct Sequencer {
    window_ns: u64,
    /// Held items that arrived in order (the common case), oldest first:
    /// pushed and popped in O(1).
    in_order: std::collections::VecDeque<Held>,
    /// Held items that arrived out of order.
    heap: BinaryHeap<Reverse<Held>>,
    seq: u64,
    header: Option<Box<Header>>,
    /// Newest timestamp pushed, and newest judged.
    newest: u64,
    judged: u64,
    /// Events that arrived after later ones were already judged (more than
    /// the window out of order); judged at once, counted.
    pub late: u64,
}

impl Sequencer {
    pub fn new(window_ns: u64) -> Self {
        Self {
            window_ns,
            in_order: std::collections::VecDeque::new(),
            heap: BinaryHeap::new(),
            seq: 0,
            header: None,
            newest: 0,
            judged: 0,
            late: 0,
        }
    }

    /// The clock pair of the header in effect.
    pub fn clock(&self) -> Option<ClockPair> {
        self.header.as_ref().map(|h| h.clock)
    }

    pub fn push(&mut self, record: Record, judge: &mut impl FnMut(Step<'_>)) {
        match record {
            Record::Header(h) => {
                let boundary = self.header.as_ref().and_then(|prev| {
                    if prev.boot_id != h.boot_id {
                        Some(Boundary::NewBoot)
                    } else if continues(prev, &h) {
                        None
                    } else {
                        Some(Boundary::NewRecording)
                    }
                });
                if let Some(b) = boundary {
                    self.drain(None, judge);
                    judge(Step::Boundary(b));
                    self.newest = 0;
                    self.judged = 0;
                }
                self.header = Some(h);
            }
            Record::Event(ev) => {
                let ts = ev.ts_ns;
                self.hold(ts, Item::Event(ev), judge);
            }
            Record::Loss(l) if l.lost > 0 => self.hold(l.from_ns, Item::Gap, judge),
            Record::Skipped => self.hold(self.newest, Item::Gap, judge),
            Record::Loss(_) | Record::Finding(_) | Record::Vm(_) | Record::Summary => {}
        }
    }

    pub(super) fn hold(&mut self, ts: u64, item: Item, judge: &mut impl FnMut(Step<'_>)) {
        let clock = self.clock();
        if ts < self.judged {
            self.late += 1;
            Self::judge_one(clock, item, judge);
            return;
        }
        self.seq += 1;
        let held = Held {
            ts,
            seq: self.seq,
            clock,
            item,
        };
        // Arrival numbers only grow: a timestamp no older than the newest
        // in order keeps that queue sorted by (timestamp, arrival).
        if self.in_order.back().is_none_or(|b| b.ts <= ts) {
            self.in_order.push_back(held);
        } else {
            self.heap.push(Reverse(held));
        }
        self.newest = self.newest.max(ts);
        if let Some(horizon) = self.newest.checked_sub(self.window_ns) {
            self.drain(Some(horizon), judge);
        }
        while self.in_order.len() + self.heap.len() > REORDER_CAP {
            self.pop(judge);
        }
    }

    /// The (timestamp, arrival) of the oldest held item, and whether it is
    /// in the heap.
    pub(super) fn oldest(&self) -> Option<(u64, bool)> {
        let q = self.in_order.front().map(|h| (h.ts, h.seq));
        let h = self.heap.peek().map(|Reverse(h)| (h.ts, h.seq));
        match (q, h) {
            (Some(q), Some(h)) if h < q => Some((h.0, true)),
            (Some(q), _) => Some((q.0, false)),
            (None, Some(h)) => Some((h.0, true)),
            (None, None) => None,
        }
    }

    /// Judges everything older than `horizon` (`None`: everything).
    pub(super) fn drain(&mut self, horizon: Option<u64>, judge: &mut impl FnMut(Step<'_>)) {
        while self
            .oldest()
            .is_some_and(|(ts, _)| horizon.is_none_or(|t| ts < t))
        {
            self.pop(judge);
        }
    }

    pub(super) fn pop(&mut self, judge: &mut impl FnMut(Step<'_>)) {
        let held = match self.oldest() {
            Some((_, true)) => self.heap.pop().map(|Reverse(h)| h),
            Some((_, false)) => self.in_order.pop_front(),
            None => None,
        };
        if let Some(h) = held {
            self.judged = self.judged.max(h.ts);
            Self::judge_one(h.clock, h.item, judge);
        }
    }

    pub(super) fn judge_one(
        clock: Option<ClockPair>,
        item: Item,
        judge: &mut impl FnMut(Step<'_>),
    ) {
        match item {
            Item::Event(ev) => judge(Step::Event(&ev, clock)),
            Item::Gap => judge(Step::Boundary(Boundary::Gap)),
        }
    }

    /// Judges what is still held.
    pub fn finish(&mut self, judge: &mut impl FnMut(Step<'_>)) {
        self.drain(None, judge);
    }
}

/// Whether header `next` continues the recording of `prev` (the next
/// segment of the same daemon run), rather than starting a new one.
pub(super) fn continues(prev: &Header, next: &Header) -> bool {
    match (&prev.recording, &next.recording) {
        (Some(a), Some(b)) => a == b,
        _ => next.segment == prev.segment + 1 && next.command_line == prev.command_line,
    }
}
