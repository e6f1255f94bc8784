//! `tracer top` with 100 VMs of 64 vCPUs (the model's `fleet` scenario):
//! the cost of one frame drawn on ratatui's test backend (200x60), and of
//! feeding events into the view's state.
//!
//! `cargo bench -p tracer --bench top`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ratatui::{Terminal, backend::TestBackend};
use tracer::{
    model::{Behaviour, Model, Scenario, run_scenario},
    top::{state::TopState, ui},
};

fn bench(c: &mut Criterion) {
    let mut m = Model::new(Behaviour::MirrorInvalidatedByZap, 5);
    run_scenario(&mut m, Scenario::Fleet, 64, 3);
    let events = m.take_events();
    let fresh = || TopState::new("host".into(), "k".into(), "bench".into(), "plan".into());
    let mut state = fresh();
    for e in &events {
        state.event(e);
    }
    state.tick(0);
    state.tick(state.now_ns);
    assert_eq!(state.vms().len(), 100);

    let mut g = c.benchmark_group("top");
    g.throughput(Throughput::Elements(1));
    let mut term = Terminal::new(TestBackend::new(200, 60)).unwrap();
    g.bench_function("frame 100x64 (200x60)", |b| {
        b.iter(|| {
            term.draw(|f| ui::draw(f, black_box(&state))).unwrap();
        });
    });
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("state update", |b| {
        b.iter(|| {
            let mut s = fresh();
            for e in &events {
                s.event(e);
            }
            black_box(s.events)
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
