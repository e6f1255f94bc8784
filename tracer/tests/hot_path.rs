//! The per-event hot path allocates nothing once its state exists: decoding
//! a ring-buffer record, the detector on known vCPUs, the event log and the
//! flight recorder. Counted with a counting global allocator.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
};

use common::{EventKind, ProbeId, RootEvent, field};
use tracer::{
    daemon::{RecordOptions, Stream, build_pipeline},
    event::Event,
    log::Header,
    model::{Behaviour, Model, Scenario, run_scenario},
};

struct Counting;

thread_local! {
    /// Allocations by this thread: the test harness's own threads don't count.
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    ALLOCS.with(|c| c.set(c.get() + 1));
}

// SAFETY: defers to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

/// The model's steady workload: every VM and vCPU exists after the first
/// round, then rounds of guest entries and zaps.
fn steady() -> Vec<Event> {
    let mut m = Model::new(Behaviour::Mainline, 7);
    run_scenario(&mut m, Scenario::Steady, 8, 12_000);
    m.take_events()
}

#[test]
fn decoding_allocates_nothing() {
    let mut r = RootEvent::ZERO;
    r.kind = EventKind::LoadReturn as u32;
    r.probe = ProbeId::MmuLoadRet as u32;
    r.valid = field::KVM | field::VCPU | field::ROOT_HPA | field::MIRROR_ROOT_HPA | field::RET;
    // SAFETY: RootEvent is repr(C) plain data of this exact size.
    let bytes = unsafe { std::mem::transmute::<RootEvent, [u8; size_of::<RootEvent>()]>(r) };
    let before = allocs();
    let mut n = 0u64;
    for i in 0..100_000u64 {
        let mut b = bytes;
        b[..8].copy_from_slice(&i.to_ne_bytes());
        let ev = Event::decode(&b).expect("valid record");
        n += u64::from(ev.root_hpa.is_some());
    }
    assert_eq!(n, 100_000);
    assert_eq!(allocs() - before, 0, "decoding allocated");
}

#[test]
fn detect_record_and_flight_recorder_allocate_nothing_per_event() {
    let events = steady();
    let (warm, measured) = events.split_at(events.len() / 2);
    let dir = tempfile::tempdir().unwrap();
    let header = Header::for_this_host("test".into(), "model".into(), Vec::new());
    let record = RecordOptions {
        dir: dir.path().to_path_buf(),
        config: tracer::log::writer::RecordConfig {
            min_free_bytes: 0,
            ..Default::default()
        },
        flight_events: 64,
    };
    let mut p = build_pipeline(Stream::Off, Some(&record), header, false)
        .unwrap_or_else(|e| panic!("{:#}", e.error));
    for (i, ev) in warm.iter().enumerate() {
        p.event(ev);
        if i % 256 == 0 {
            p.end_batch(ev.ts_ns);
        }
    }
    let n = measured.len();
    let (mut quiet, mut quiet_allocs, mut with_finding, mut rotations) = (0u64, 0u64, 0u64, 0u64);
    let segments = |p: &tracer::pipeline::Pipeline| {
        p.recorder.as_ref().map_or(0, |r| r.stats().segments_opened)
    };
    for (i, ev) in measured.iter().enumerate() {
        let findings_before: u64 = p.tally.findings.values().sum();
        let segments_before = segments(&p);
        let before = allocs();
        p.event(ev);
        if i % 256 == 0 {
            p.end_batch(ev.ts_ns);
        }
        let spent = allocs() - before;
        if segments(&p) != segments_before {
            // A new segment every 64 MiB: names, a header, a compressor.
            rotations += 1;
        } else if p.tally.findings.values().sum::<u64>() == findings_before {
            quiet += 1;
            quiet_allocs += spent;
            if spent > 0 && std::env::var_os("HOT_PATH_DEBUG").is_some() {
                eprintln!(
                    "event {i} ({:?}, batch end {}) allocated {spent}",
                    ev.kind,
                    i % 256 == 0
                );
            }
        } else {
            // A finding builds its evidence and text: that may allocate.
            with_finding += 1;
        }
    }
    eprintln!(
        "hot path: {quiet_allocs} allocation(s) over {quiet} events without a finding \
         ({with_finding} events raised findings, {rotations} rotated the log)"
    );
    assert!(n > 50_000, "stream too short: {n}");
    assert_eq!(quiet_allocs, 0, "the per-event path allocated");
    let recorded = p.finish(0, None).expect("recording");
    assert!(recorded.records >= n as u64, "{} records", recorded.records);
}
