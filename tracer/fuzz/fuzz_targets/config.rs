//! Fuzzes the config parser: any text, as a config file, must parse into a
//! validated config or a clear error naming the file, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_core::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(std::path::Path::new("fuzz.toml"), text) {
        Ok(cfg) => assert!(cfg.validate().is_ok(), "parse returned a config validate refuses"),
        Err(e) => assert!(e.to_string().starts_with("config fuzz.toml"), "{e}"),
    }
});
