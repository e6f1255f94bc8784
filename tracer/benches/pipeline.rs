//! Userspace pipeline benchmarks: decoding ring-buffer records, the
//! detector, and JSON encoding, each on one core, in events per second.
//!
//! `cargo bench -p tracer --bench pipeline`

use std::hint::black_box;

use common::{EventKind, ProbeId, RootEvent, field};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tracer::{
    detector::{Detector, DetectorConfig},
    event::Event,
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
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
