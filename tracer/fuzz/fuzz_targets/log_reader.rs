//! Fuzzes the event-log reader: any bytes, as a log file, must be read
//! without a panic, and every line must be accounted for (a record, or a
//! reported problem).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer::log::reader::{ReadStats, read_one};

fuzz_target!(|data: &[u8]| {
    let mut stats = ReadStats::default();
    let mut records = 0u64;
    read_one("fuzz", data, &mut stats, &mut |_, _| records += 1);
    assert_eq!(records, stats.records);
    assert!(stats.torn_lines <= 1);
    assert!(stats.skipped_lines <= data.iter().filter(|&&b| b == b'\n').count() as u64 + 1);
});
