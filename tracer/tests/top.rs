//! `tracer top`: its state and its screen, drawn on ratatui's test backend
//! from model event streams, and driven with keys.

#[path = "support/screen.rs"]
mod screen;

use std::borrow::Cow;

use screen::vm_rows;

use ratatui::{
    Terminal,
    backend::TestBackend,
    crossterm::event::{KeyCode, KeyEvent, KeyModifiers},
};
use tracer::{
    event::{Comm, Event, Kind},
    model::{Behaviour, FLEET_VMS, Model, Scenario, run_scenario},
    top::{
        state::{Action, SortKey, TopState},
        ui,
    },
};

fn model(behaviour: Behaviour, scenario: Scenario, vcpus: usize, rounds: usize) -> Vec<Event> {
    let mut m = Model::new(behaviour, 3);
    run_scenario(&mut m, scenario, vcpus, rounds);
    m.take_events()
}

fn state_of(events: &[Event]) -> TopState {
    let mut s = TopState::new(
        "testhost".into(),
        "6.18-test".into(),
        "replay of test".into(),
        "12 probe(s) as recorded".into(),
    );
    for e in events {
        s.event(e);
    }
    s
}

/// The screen as text, one line per row.
fn screen(term: &mut Terminal<TestBackend>, s: &TopState) -> String {
    term.draw(|f| ui::draw(f, s)).unwrap();
    let buf = term.backend().buffer();
    let width = usize::from(buf.area.width);
    buf.content()
        .chunks(width)
        .map(|row| {
            row.iter()
                .map(ratatui::buffer::Cell::symbol)
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn term(w: u16, h: u16) -> Terminal<TestBackend> {
    Terminal::new(TestBackend::new(w, h)).unwrap()
}

fn key(c: char) -> KeyEvent {
    KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE)
}

fn code(c: KeyCode) -> KeyEvent {
    KeyEvent::new(c, KeyModifiers::NONE)
}

#[test]
fn shows_vms_vcpu_roots_and_findings_of_a_faulty_kernel() {
    let events = model(Behaviour::MirrorFreedByZap, Scenario::Steady, 4, 200);
    let s = state_of(&events);
    let mut t = term(140, 45);
    let text = screen(&mut t, &s);
    assert!(text.contains("tracer top"), "{text}");
    assert!(text.contains("host testhost"), "{text}");
    assert!(text.contains("VMs 3 (2 TDX)"), "{text}");
    assert!(text.contains("vCPUs 12"), "{text}");
    assert_eq!(vm_rows(&text).len(), 3, "{text}");
    // Sorted by findings, most first: a TDX VM is selected, and its vCPUs
    // show a valid direct root beside an invalid mirror root.
    assert!(vm_rows(&text)[0].contains("tdx"), "{text}");
    assert!(text.contains("vCPUs of VMM"), "{text}");
    assert!(text.contains("INVALID"), "{text}");
    assert!(text.contains("valid 0x"), "{text}");
    assert!(text.contains("mirror_roots_invalidated_live"), "{text}");
    assert!(text.contains("newest: "), "{text}");
    // The critical kind leads the summary even when newer errors fill the
    // list.
    let summary = text.lines().find(|l| l.contains("by kind:")).unwrap();
    assert!(
        summary.find("mirror_root_invalid_at_entry ×")
            < summary.find("mirror_roots_invalidated_live ×"),
        "{summary}"
    );
    assert!(s.findings_total > 0 && s.critical_total > 0);
}

#[test]
fn healthy_kernel_shows_no_findings_and_valid_mirror_roots() {
    let events = model(Behaviour::Mainline, Scenario::Hotplug, 2, 20);
    let s = state_of(&events);
    let text = screen(&mut term(140, 45), &s);
    assert!(text.contains("findings 0 (0 critical)"), "{text}");
    assert!(text.contains("Findings (0"), "{text}");
    // Every TDX vCPU has a valid mirror root.
    assert!(text.contains("valid 0x"), "{text}");
    assert!(!text.contains("INVALID"), "{text}");
}

#[test]
fn keys_sort_filter_select_and_quit() {
    let events = model(Behaviour::MirrorFreedByZap, Scenario::Steady, 4, 200);
    let mut s = state_of(&events);
    let mut t = term(140, 45);

    assert_eq!(s.sort, SortKey::Findings);
    assert_eq!(s.key(key('s')), Action::None);
    assert_eq!(s.sort, SortKey::ZapsPerS);
    assert!(screen(&mut t, &s).contains("sort: zaps/s ▼"));
    s.key(key('r'));
    assert!(screen(&mut t, &s).contains("sort: zaps/s ▲"));
    for _ in 0..3 {
        s.key(key('s'));
    }
    assert_eq!(s.sort, SortKey::Pid);
    let text = screen(&mut t, &s);
    let pids: Vec<&str> = vm_rows(&text)
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(pids, ["4001", "4002", "4003"], "ascending by pid:\n{text}");

    // Selection moves down and the vCPU pane follows.
    assert!(text.contains("vCPUs of VMM 4001"), "{text}");
    s.key(code(KeyCode::Down));
    assert!(screen(&mut t, &s).contains("vCPUs of VMM 4002"));
    s.key(code(KeyCode::End));
    assert!(screen(&mut t, &s).contains("vCPUs of VMM 4003"));
    s.key(code(KeyCode::Down));
    assert!(
        screen(&mut t, &s).contains("vCPUs of VMM 4003"),
        "stays on the last"
    );

    // `/` filters: by pid, by type; no match says so; Esc clears.
    for k in [
        key('/'),
        key('4'),
        key('0'),
        key('0'),
        key('3'),
        code(KeyCode::Enter),
    ] {
        assert_eq!(
            s.key(k),
            Action::None,
            "q typed into the filter must not quit"
        );
    }
    let text = screen(&mut t, &s);
    assert_eq!(vm_rows(&text).len(), 1, "{text}");
    assert!(text.contains("filter: 4003"), "{text}");
    s.key(code(KeyCode::Esc));
    for k in [key('/'), key('t'), key('d'), key('x'), code(KeyCode::Enter)] {
        s.key(k);
    }
    assert_eq!(vm_rows(&screen(&mut t, &s)).len(), 2);
    s.key(code(KeyCode::Esc));
    for k in [key('/'), key('q'), key('z'), code(KeyCode::Enter)] {
        s.key(k);
    }
    assert!(screen(&mut t, &s).contains("no VM matches the filter"));
    s.key(code(KeyCode::Esc));
    assert_eq!(vm_rows(&screen(&mut t, &s)).len(), 3);

    assert_eq!(s.key(key(' ')), Action::TogglePause);
    assert_eq!(s.key(key('+')), Action::Faster);
    assert_eq!(s.key(key('-')), Action::Slower);
    assert_eq!(s.key(key('q')), Action::Quit);
    assert_eq!(
        s.key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
        Action::Quit
    );
}

#[test]
fn copes_with_tiny_terminals_and_resizes() {
    let events = model(Behaviour::Mainline, Scenario::Steady, 4, 20);
    let s = state_of(&events);
    let text = screen(&mut term(30, 8), &s);
    assert!(text.contains("needs 60x16"), "{text}");
    assert!(text.contains("q quits"), "{text}");
    let mut t = term(140, 45);
    assert!(screen(&mut t, &s).contains("tracer top"));
    for (w, h) in [(60, 16), (59, 16), (200, 60), (1, 1), (80, 24)] {
        t.backend_mut().resize(w, h);
        t.resize(ratatui::layout::Rect::new(0, 0, w, h)).unwrap();
        let text = screen(&mut t, &s);
        assert_eq!(text.lines().count(), usize::from(h));
        if w >= ui::MIN_WIDTH && h >= ui::MIN_HEIGHT {
            assert!(text.contains("tracer top"), "{w}x{h}:\n{text}");
        } else if w >= 20 {
            assert!(text.contains("tracer top: the"), "{w}x{h}:\n{text}");
        }
    }
}

fn raw(kind: Kind, ts_ns: u64, kvm: u64, vcpu: Option<u64>) -> Event {
    Event {
        probe: Cow::Borrowed("test"),
        pid: 7,
        tid: 7,
        comm: Comm::new("qemu").unwrap(),
        kvm: Some(kvm),
        vcpu,
        vcpu_id: vcpu.map(|v| i32::try_from(v & 0xff).unwrap()),
        userspace_pid: Some(7),
        vm_type: Some(0),
        ..Event::bare(kind, ts_ns)
    }
}

#[test]
fn rates_come_from_event_time_and_teardown_removes_rows() {
    let mut s = state_of(&[]);
    let kvm = 0xffff_8881_0000_0000;
    s.event(&raw(Kind::RunExit, 1, kvm, Some(0x10)));
    s.tick(1_000_000_000);
    for i in 0..6 {
        s.event(&raw(Kind::ZapAllFast, 1_000_000_000 + i, kvm, None));
    }
    let mut load = raw(Kind::LoadReturn, 1_500_000_000, kvm, Some(0x10));
    load.ret = Some(-12);
    s.event(&load);
    s.tick(3_000_000_000);
    let vms = s.vms();
    let vm = &vms[&kvm];
    assert!((vm.zaps_per_s - 3.0).abs() < 1e-9, "{}", vm.zaps_per_s);
    assert!((vm.loads_per_s - 0.5).abs() < 1e-9, "{}", vm.loads_per_s);
    assert!((s.events_per_s - 3.5).abs() < 1e-9, "{}", s.events_per_s);
    let text = screen(&mut term(140, 40), &s);
    assert!(text.contains("-12 (-ENOMEM)"), "{text}");
    assert!(text.contains("mmu_load_failed"), "{text}");

    s.event(&raw(Kind::VcpuDestroy, 4, kvm, Some(0x10)));
    assert!(s.vms()[&kvm].vcpus.is_empty());
    s.event(&raw(Kind::VmDestroy, 5, kvm, None));
    assert!(s.vms().is_empty());
    assert!(screen(&mut term(140, 40), &s).contains("no VM seen yet"));

    // Issue 12, ghost VMs: kvm_arch_destroy_vm() zaps a default VM's private
    // memslots and destroys its vCPUs after the VM's own teardown event.
    s.event(&raw(Kind::ZapAllFast, 6, kvm, None));
    s.event(&raw(Kind::VcpuDestroy, 7, kvm, Some(0x10)));
    let mut inval = raw(Kind::InvalidateRoots, 8, kvm, None);
    inval.arg = Some(6);
    s.event(&inval);
    assert!(s.vms().is_empty(), "a destroyed VM came back");
    assert!(screen(&mut term(140, 40), &s).contains("VMs 0"));
}

#[test]
fn a_hundred_vms_of_64_vcpus() {
    let events = model(Behaviour::Mainline, Scenario::Fleet, 64, 3);
    let mut s = state_of(&events);
    s.tick(0);
    s.tick(s.now_ns);
    let mut t = term(200, 60);
    let started = std::time::Instant::now();
    let frames = 50;
    let mut text = String::new();
    for _ in 0..frames {
        text = screen(&mut t, &s);
    }
    let per_frame = started.elapsed() / frames;
    eprintln!(
        "100 VMs x 64 vCPUs: {per_frame:?} per frame on the test backend, 200x60 (debug build here; `cargo xtask bench` has the release figure)"
    );
    assert!(
        text.contains(&format!("VMs {FLEET_VMS} (25 TDX)")),
        "{text}"
    );
    assert!(text.contains("vCPUs 6400"), "{text}");
    assert!(
        text.contains("(tdx, 64 vCPUs") || text.contains("(default, 64 vCPUs"),
        "{text}"
    );
}
