//! The event-record fast path (`tracer_core::event_json`) answers what serde
//! answers: every event the writer writes reads back the same through it,
//! and on lines mutated every which way it either steps aside (`None`, and
//! serde decides) or gives exactly serde's event.

use std::borrow::Cow;

use proptest::prelude::*;
use tracer_core::{
    event::{Comm, Event, Kind},
    event_json::parse_event,
};

fn kind() -> impl Strategy<Value = Kind> {
    prop::sample::select(Kind::ALL.to_vec())
}

prop_compose! {
    fn event()(
        ts_ns in any::<u64>(),
        kind in kind(),
        probe in prop::sample::select(vec!["kvm_entry_gate", "model", "other-probe"]),
        (cpu, pid, tid) in (any::<u32>(), any::<u32>(), any::<u32>()),
        comm in "[a-zA-Z0-9 _/-]{0,16}",
        (kvm, vcpu, root_hpa, root_pgd, mirror_root_hpa, before_hpa) in (
            any::<Option<u64>>(), any::<Option<u64>>(), any::<Option<u64>>(),
            any::<Option<u64>>(), any::<Option<u64>>(), any::<Option<u64>>()),
        (vcpu_id, userspace_pid, vm_type) in (
            any::<Option<i32>>(), any::<Option<i32>>(), any::<Option<u8>>()),
        (root_role, mirror_role, mirror_stale, mmu_valid_gen) in (
            any::<Option<u32>>(), any::<Option<u32>>(), any::<Option<bool>>(), any::<Option<u8>>()),
        (memslots_gen, ret, arg, duration_ns) in (
            any::<Option<u64>>(), any::<Option<i64>>(), any::<Option<u64>>(), any::<Option<u64>>()),
    ) -> Event {
        Event {
            ts_ns, kind, probe: Cow::Owned(probe.to_owned()), cpu, pid, tid,
            comm: Comm::new(&comm).unwrap(),
            kvm, vcpu, vcpu_id, userspace_pid, vm_type, root_hpa, root_pgd,
            mirror_root_hpa, root_role, mirror_role, mirror_stale, mmu_valid_gen,
            memslots_gen, ret, arg, before_hpa, duration_ns,
        }
    }
}

/// A change to a line: cut it, overwrite a byte, insert a snippet.
#[derive(Debug, Clone)]
enum Mutation {
    Cut(usize),
    Set(usize, u8),
    Insert(usize, &'static str),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Cut),
        (
            any::<usize>(),
            prop::sample::select(b"0123456789\"\\:,{}-.eE x\t".to_vec())
        )
            .prop_map(|(i, b)| Mutation::Set(i, b)),
        (
            any::<usize>(),
            prop::sample::select(vec![
                " ",
                "0",
                "-",
                ".5",
                "e3",
                "\\n",
                "null",
                ",\"kvm\":\"0x1\"",
                ",\"x\":1",
                ",\"cpu\":1",
                "\"",
                "}",
                "ü",
                ",\"vm_type\":256",
                ",\"ts_ns\":01",
            ])
        )
            .prop_map(|(i, s)| Mutation::Insert(i, s)),
    ]
}

fn apply(line: &str, m: &Mutation) -> String {
    let at = |i: usize| {
        let mut i = i % (line.len() + 1);
        while !line.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    match m {
        Mutation::Cut(i) => line[..at(*i)].to_owned(),
        Mutation::Set(i, b) => {
            let i = at(*i).min(line.len().saturating_sub(1));
            let mut v = line.as_bytes().to_vec();
            if let Some(c) = v.get_mut(i) {
                *c = *b;
            }
            String::from_utf8(v).unwrap_or_else(|_| line.to_owned())
        }
        Mutation::Insert(i, s) => {
            let i = at(*i);
            format!("{}{s}{}", &line[..i], &line[i..])
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn written_events_read_back_through_the_fast_path(ev in event()) {
        let line = ev.to_json_record();
        prop_assert_eq!(parse_event(&line), Some(ev));
        // With the stamps the log adds.
        let stamped = format!(
            "{},\"time\":\"2026-11-28T00:00:00.000Z\",\"host\":\"h\"}}",
            &line[..line.len() - 1]
        );
        prop_assert!(parse_event(&stamped).is_some());
    }

    #[test]
    fn on_mutated_lines_the_fast_path_steps_aside_or_agrees_with_serde(
        ev in event(),
        muts in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut line = ev.to_json_record();
        for m in &muts {
            line = apply(&line, m);
        }
        if let Some(fast) = parse_event(&line) {
            let slow: Result<Event, _> = serde_json::from_str(&line);
            prop_assert!(slow.is_ok(), "fast read {line:?}, serde refused: {slow:?}");
            prop_assert_eq!(fast, slow.unwrap(), "{}", line);
        }
    }
}

#[test]
fn what_serde_refuses_the_fast_path_leaves_to_serde() {
    let ev = r#"{"record":"event","ts_ns":1,"kind":"run_exit","probe":"model","cpu":0,"pid":1,"tid":1,"comm":"q""#;
    for tail in [
        r#","cpu":2}"#,             // duplicate field
        r#","vm_type":256}"#,       // out of range
        r#","ts_ns2":01}"#,         // leading zero
        r#","kvm":"0xzz"}"#,        // bad hex
        "} trailing",               // after the object
        r#","comm2":"\u0041"}"#,    // an escape
        r#","mirror_stale":null}"#, // null
    ] {
        let line = format!("{ev}{tail}");
        assert!(parse_event(&line).is_none(), "{line}");
    }
    assert!(parse_event(&format!("{ev}}}")).is_some());
    // Missing a required field.
    assert!(parse_event(r#"{"record":"event","ts_ns":1,"kind":"run_exit"}"#).is_none());
}

/// Hex values the writer never writes still read as serde reads them:
/// the fast decoding covers 1 to 16 plain digits, the rest is
/// `from_str_radix`'s (a sign, leading zeros past 16 digits, overflow).
#[test]
fn hex_values_read_as_serde_reads_them() {
    let ev = r#"{"record":"event","ts_ns":1,"kind":"run_exit","probe":"model","cpu":0,"pid":1,"tid":1,"comm":"q""#;
    for kvm in [
        "0x0",
        "0xffffffffffffffff",
        "0xFFFF888100010000",
        "0xAbCd",
        "0x+1f",
        "0x",
        "0x00000000000000001",
        "0x10000000000000000",
        "0x-1",
        "0xg",
        "0x12 ",
        "1f",
    ] {
        let line = format!(r#"{ev},"kvm":"{kvm}"}}"#);
        let fast = parse_event(&line);
        let slow: Option<Event> = serde_json::from_str(&line).ok();
        assert_eq!(fast, slow, "{kvm}");
    }
}
