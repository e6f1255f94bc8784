//! Man pages and shell completions, generated from the CLI's own clap
//! definition so they can't drift from `--help`: `tracer generate man DIR`
//! and `tracer generate completion SHELL` (hidden; `cargo xtask dist` runs
//! them for the Debian package).

use std::path::Path;

use anyhow::{Context as _, Result};
use clap_complete::Shell;

/// Writes `tracer.1` and one `tracer-<command>.1` per visible subcommand
/// into `dir`; returns the file names.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, dir, &mut written)?;
    Ok(written)
}

fn write_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<String>) -> Result<()> {
    let page = clap_mangen::Man::new(cmd.clone())
        .date(crate::BUILD_DATE)
        .source(format!("kvm-root-tracer {}", crate::VERSION))
        .manual("kvm-root-tracer manual");
    let path = page
        .generate_to(dir)
        .with_context(|| format!("writing {} in {}", page.get_filename(), dir.display()))?;
    written.push(page.get_filename());
    log::debug!("wrote {}", path.display());
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    Ok(())
}

/// The completion script for `shell`, on `out`.
pub fn completion(mut cmd: clap::Command, shell: Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut cmd, "tracer", out);
}
