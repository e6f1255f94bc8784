//! `tracer doctor`: what this kernel allows, and the plan the tracer would
//! follow. Loads nothing, so it is safe to run anywhere.

use std::{io::Write as _, path::Path};

use serde::Serialize;

use crate::{
    Failure,
    kernel::{self, KernelError, KernelInfo, PlanOptions},
};

/// Maps kernel inspection errors to the exit-code contract.
pub fn kernel_failure(e: KernelError) -> Failure {
    match e {
        KernelError::Io { .. } => Failure::from(anyhow::Error::new(e)),
        _ => Failure::unsupported(e),
    }
}

#[derive(Serialize)]
struct Environment {
    root: bool,
    dev_kvm: bool,
    kallsyms_symbols: usize,
}

#[derive(Serialize)]
struct Report<'a> {
    environment: Environment,
    #[serde(flatten)]
    plan: &'a kernel::AttachPlan,
}

pub fn run(root: Option<&Path>, json: bool) -> Result<(), Failure> {
    let info = match root {
        Some(r) => KernelInfo::inspect(r),
        None => KernelInfo::live(),
    }
    .map_err(kernel_failure)?;
    let plan = kernel::plan::plan(&info, PlanOptions::default());
    let env = Environment {
        // SAFETY: geteuid has no preconditions and can't fail.
        root: unsafe { libc::geteuid() } == 0,
        dev_kvm: info.dev_kvm,
        kallsyms_symbols: info.symbols.len(),
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(
            &mut out,
            &Report {
                environment: env,
                plan: &plan,
            },
        )
        .map_err(anyhow::Error::from)?;
        writeln!(out).map_err(anyhow::Error::from)?;
        return Ok(());
    }
    let w = |out: &mut std::io::StdoutLock<'_>, s: String| {
        let _ = writeln!(out, "{s}");
    };
    w(
        &mut out,
        format!(
            "kernel {}  KVM {}  BTF {}",
            plan.kernel_release,
            match plan.kvm {
                kernel::KvmLocation::BuiltIn => "built in",
                kernel::KvmLocation::Module => "module",
            },
            plan.btf_sources.join(" + ")
        ),
    );
    w(
        &mut out,
        format!(
            "running as root: {}  /dev/kvm: {}  kallsyms symbols: {}",
            yes(env.root),
            yes(env.dev_kvm),
            env.kallsyms_symbols
        ),
    );
    w(&mut out, format!("\nprobes ({}):", plan.summary()));
    for p in &plan.probes {
        w(
            &mut out,
            format!(
                "  {:<28} {:<15} {:<30} {}",
                p.program,
                p.attach.to_string(),
                p.target,
                p.reason
            ),
        );
    }
    w(&mut out, "\nfields (from BTF):".into());
    for f in &plan.fields {
        match (f.offset, &f.absent) {
            (Some(o), _) => w(&mut out, format!("  {:<28} +{o:<6} ({o:#x})", f.name)),
            (None, Some(why)) => w(&mut out, format!("  {:<28} absent  {why}", f.name)),
            (None, None) => w(&mut out, format!("  {:<28} absent", f.name)),
        }
    }
    w(&mut out, "\nfeatures:".into());
    for f in &plan.features {
        w(
            &mut out,
            format!(
                "  {:<28} {:<4} {}",
                f.name,
                if f.enabled { "on" } else { "off" },
                f.reason
            ),
        );
    }
    if !env.root {
        w(
            &mut out,
            "\nnote: `tracer watch` needs root (CAP_BPF, CAP_PERFMON); doctor does not.".into(),
        );
    }
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}
