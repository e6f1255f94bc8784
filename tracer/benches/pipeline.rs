//! Userspace pipeline benchmarks: decoding ring-buffer records, the
//! detector, and JSON encoding, each on one core, in events per second.
//!
//! `cargo bench -p tracer --bench pipeline`
#![expect(
    clippy::cast_precision_loss,
    reason = "byte ratios, printed with one decimal"
)]

use std::hint::black_box;

use common::{EventKind, ProbeId, RootEvent, field};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tracer::{
    detector::{Detector, DetectorConfig},
    event::Event,
    log::{
        Header,
        reader::{ReadStats, Record, read_one},
        writer::{FsyncPolicy, RecordConfig, Recorder},
    },
    model::{Behaviour, Model, Scenario, run_scenario},
};

/// A realistic stream: the model's `steady` workload, 16 vCPUs per VM.
fn model_events() -> Vec<Event> {
    let mut m = Model::new(Behaviour::Mainline, 1);
    run_scenario(&mut m, Scenario::Hotplug, 16, 400);
    m.take_events()
}

fn raw_records(events: &[Event]) -> Vec<[u8; size_of::<RootEvent>()]> {
    events
        .iter()
        .map(|e| {
            let mut r = RootEvent::ZERO;
            r.ts_ns = e.ts_ns;
            r.kind = EventKind::LoadReturn as u32;
            r.probe = ProbeId::MmuLoadRet as u32;
            r.kvm = e.kvm.unwrap_or(0);
            r.vcpu = e.vcpu.unwrap_or(0);
            r.root_hpa = e.root_hpa.unwrap_or(0);
            r.mirror_root_hpa = e.mirror_root_hpa.unwrap_or(0);
            r.valid = field::KVM | field::VCPU | field::ROOT_HPA | field::MIRROR_ROOT_HPA;
            r.comm[..4].copy_from_slice(b"qemu");
            // SAFETY: RootEvent is repr(C) plain data of this exact size.
            unsafe { std::mem::transmute::<RootEvent, [u8; size_of::<RootEvent>()]>(r) }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let events = model_events();
    let raw = raw_records(&events);
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(events.len() as u64));

    g.bench_function("decode", |b| {
        b.iter(|| {
            for r in &raw {
                black_box(Event::decode(black_box(r)).unwrap());
            }
        });
    });
    g.bench_function("detect", |b| {
        b.iter(|| {
            let mut d = Detector::new(DetectorConfig::default());
            let mut out = Vec::new();
            for e in &events {
                d.observe(black_box(e), &mut out);
            }
            black_box(out.len())
        });
    });
    g.bench_function("decode+detect", |b| {
        b.iter(|| {
            let mut d = Detector::new(DetectorConfig::default());
            let mut out = Vec::new();
            for r in &raw {
                let e = Event::decode(r).unwrap();
                d.observe(&e, &mut out);
            }
            black_box(out.len())
        });
    });
    g.bench_function("json-encode", |b| {
        b.iter(|| {
            let mut bytes = 0;
            for e in &events {
                bytes += black_box(e.to_json_record()).len();
            }
            bytes
        });
    });
    g.bench_function("detect+record", |b| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RecordConfig {
            fsync: FsyncPolicy::Never,
            compress: false,
            max_segment_bytes: u64::MAX,
            min_free_bytes: 0,
            ..RecordConfig::default()
        };
        let header = Header::for_this_host("bench".into(), "bench".into(), vec![]);
        let mut rec = Recorder::open(dir.path(), cfg, header, true).unwrap();
        b.iter(|| {
            let mut d = Detector::new(DetectorConfig::default());
            let mut out = Vec::new();
            for (i, e) in events.iter().enumerate() {
                d.observe(e, &mut out);
                rec.event(e);
                if i % 1024 == 1023 {
                    rec.flush(e.ts_ns).unwrap();
                }
            }
            rec.flush(0).unwrap();
            black_box(out.len())
        });
    });

    // The log as it lands on disk.
    let mut jsonl = Vec::new();
    for e in &events {
        e.write_json_record(&mut jsonl);
        jsonl.push(b'\n');
    }
    let zst = zstd::encode_all(jsonl.as_slice(), 3).unwrap();
    eprintln!(
        "event log: {} events, {:.1} bytes/event raw JSON lines, {:.1} bytes/event zstd-3 ({:.1}x)",
        events.len(),
        jsonl.len() as f64 / events.len() as f64,
        zst.len() as f64 / events.len() as f64,
        jsonl.len() as f64 / zst.len() as f64
    );
    g.bench_function("replay (parse+detect)", |b| {
        b.iter(|| {
            let mut d = Detector::new(DetectorConfig::default());
            let mut found = Vec::new();
            let mut stats = ReadStats::default();
            read_one("bench", jsonl.as_slice(), &mut stats, &mut |_, r| {
                if let Record::Event(e) = r {
                    d.observe(&e, &mut found);
                }
            });
            assert_eq!(stats.events as usize, events.len());
            black_box(found.len())
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
