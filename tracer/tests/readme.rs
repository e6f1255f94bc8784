//! The README as a tested artifact: the commands it shows for trying the
//! tool without a TDX host run here, with the outcome the README states
//! (the findings it names, the counts its captures show, the exit codes).

#[path = "support/cli.rs"]
mod support;

use std::{path::PathBuf, process::Command};

fn readme() -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap()
}

/// Runs a README shell line with the built `tracer` first on PATH.
fn sh(line: &str, dir: &std::path::Path) -> support::Run {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tracer"));
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    support::run(
        Command::new("bash")
            .args(["-o", "pipefail", "-c", line])
            .env("PATH", path)
            .current_dir(dir),
    )
}

/// Every `tracer simulate … | tracer replay …` line of the README's shell
/// blocks finds something and exits 1, as the README says replay does.
#[test]
fn every_simulate_replay_example_finds_what_it_promises() {
    let text = readme();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tracer simulate") && l.contains("| tracer replay"))
        .collect();
    assert!(lines.len() >= 3, "{lines:?}");
    let dir = tempfile::tempdir().unwrap();
    for line in lines {
        let r = sh(line, dir.path());
        assert_eq!(r.code, Some(1), "{line}: {}", r.stderr);
        assert!(
            r.stdout.contains("FINDING") || r.stdout.contains("\"record\":\"finding\""),
            "{line}"
        );
    }
}

/// Each kernel behaviour the README lists raises, with default flags, the
/// findings the README names for it; mainline raises none.
#[test]
fn each_behaviour_raises_the_findings_the_readme_names_with_default_flags() {
    let text = readme();
    let dir = tempfile::tempdir().unwrap();
    for (kernel, kinds) in [
        ("mainline", &[][..]),
        (
            "v3-unconditional-mirror-alloc",
            &["mirror_root_realloc_while_valid"][..],
        ),
        (
            "mirror-invalidated-by-zap",
            &["mirror_root_stale_after_load", "mirror_root_stale_at_entry"][..],
        ),
        ("mirror-freed-by-zap", &["mirror_root_invalid_at_entry"][..]),
    ] {
        assert!(
            text.contains(&format!("- `{kernel}`")),
            "the README lists {kernel}"
        );
        let r = sh(
            &format!("tracer simulate --kernel {kernel} | tracer replay --json -"),
            dir.path(),
        );
        if kinds.is_empty() {
            assert_eq!(r.code, Some(0), "{kernel}: {}", r.stdout);
        } else {
            assert_eq!(r.code, Some(1), "{kernel}: {}", r.stderr);
        }
        for k in kinds {
            assert!(
                r.stdout.contains(&format!("\"kind\":\"{k}\"")),
                "{kernel} with default flags raised no {k}"
            );
        }
    }
}

/// The `top --replay` capture: the command in the sentence before it,
/// run as written, records the events and findings the capture shows.
#[test]
fn the_top_capture_counts_come_from_its_command() {
    let text = readme();
    let flat = text.replace('\n', " ");
    let start = flat
        .find("(`tracer simulate --kernel mirror-freed-by-zap")
        .expect("the capture's command");
    let cmd = &flat[start + 2..];
    let cmd = &cmd[..cmd.find('`').unwrap()];
    let capture = text
        .lines()
        .find(|l| l.starts_with("events ") && l.contains("findings "))
        .expect("the capture's counts line");
    let number_after = |word: &str| -> u64 {
        let at = capture.find(word).unwrap() + word.len();
        capture[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (events, findings) = (number_after("events "), number_after("findings "));
    let dir = tempfile::tempdir().unwrap();
    let r = sh(cmd.replace("/tmp/log", "log").as_str(), dir.path());
    assert_eq!(r.code, Some(0), "{cmd}: {}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "recorded {events} event(s) and {findings} finding(s)"
        )),
        "the README shows {events} events and {findings} findings; `{cmd}` said: {}",
        r.stderr
    );
}
