//! Fuzzes the event-log reader: any bytes, as a log file, must be read
//! without a panic, and every line must be accounted for (a record, or a
//! reported problem).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_core::log::reader::{PROBLEMS_KEPT, ReadStats, Record, read_one};

fuzz_target!(|data: &[u8]| {
    let mut stats = ReadStats::default();
    let (mut records, mut gaps) = (0u64, 0u64);
    read_one("fuzz", data, &mut stats, &mut |_, r| match r {
        // Not a record of the file: a gap where a line could not be read.
        Record::Skipped => gaps += 1,
        _ => records += 1,
    });
    assert_eq!(records, stats.records);
    assert_eq!(gaps, stats.skipped_lines);
    assert!(stats.torn_lines <= 1);
    // Memory stays bounded: problems beyond the cap are only counted.
    assert!(stats.problems.len() <= PROBLEMS_KEPT);
    assert!(stats.skipped_lines <= data.iter().filter(|&&b| b == b'\n').count() as u64 + 1);
});
