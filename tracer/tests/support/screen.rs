//! Reading `tracer top` screens in tests.

/// The VM table's data rows: lines that start with a VMM pid and a VM type.
pub fn vm_rows(screen: &str) -> Vec<&str> {
    screen
        .lines()
        .filter(|l| {
            let mut w = l.split_whitespace();
            w.next().is_some_and(|p| p.parse::<u32>().is_ok())
                && w.next().is_some_and(|t| ["tdx", "default"].contains(&t))
        })
        .collect()
}
