//! `tracer doctor`: what this kernel allows, and the plan the tracer would
//! follow. Loads nothing, so it is safe to run anywhere.

use std::{io::Write as _, path::Path};

use serde::Serialize;

use crate::{
    Failure,
    kernel::{self, KernelError, KernelInfo, PlanOptions},
    loader::{Verdict, verify_all},
};

/// Maps kernel inspection errors to the exit-code contract.
pub fn kernel_failure(e: KernelError) -> Failure {
    match e {
        KernelError::Io { .. } => Failure::from(anyhow::Error::new(e)),
        _ => Failure::unsupported(e),
    }
}

#[derive(Clone, Copy, Serialize)]
struct Environment {
    root: bool,
    dev_kvm: bool,
    kallsyms_symbols: usize,
    /// How the plan's symbols were found (with `looked-up`,
    /// `kallsyms_symbols` counts the names found).
    kallsyms: SymbolSource,
}

/// `read` from kallsyms, or `looked-up` by name.
#[derive(Clone, Copy, Serialize)]
#[serde(rename_all = "kebab-case")]
enum SymbolSource {
    Read,
    LookedUp,
}

impl Environment {
    /// How many symbols kallsyms gave, or how many of the plan's names a
    /// lookup found.
    fn kallsyms_line(&self) -> String {
        match self.kallsyms {
            SymbolSource::Read => format!("kallsyms symbols: {}", self.kallsyms_symbols),
            SymbolSource::LookedUp => format!(
                "kallsyms: {} of {} names found (looked up by name)",
                self.kallsyms_symbols,
                kernel::plan::KALLSYMS_NAMES.len()
            ),
        }
    }
}

#[derive(Serialize)]
struct Report<'a> {
    environment: Environment,
    #[serde(flatten)]
    plan: &'a kernel::AttachPlan,
    #[serde(skip_serializing_if = "Option::is_none")]
    verifier: Option<&'a [Verdict]>,
}

/// `tracer doctor`. With `verify`, also loads every program (needs root).
pub fn run(root: Option<&Path>, json: bool, verify: bool) -> Result<(), Failure> {
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
        kallsyms: if info.symbols.is_looked_up() {
            SymbolSource::LookedUp
        } else {
            SymbolSource::Read
        },
    };
    let verdicts = if verify {
        if root.is_some() {
            return Err(anyhow::anyhow!(
                "--verify checks the running kernel; it can't be combined with --root"
            )
            .into());
        }
        if let Some(missing) = crate::live::missing_capabilities() {
            return Err(Failure::unsupported(anyhow::anyhow!(
                "doctor --verify loads eBPF programs and needs {missing}"
            )));
        }
        Some(verify_all(&plan)?)
    } else {
        None
    };
    let rejected = verdicts.as_deref().map_or(0, |v| {
        v.iter()
            .filter(|v| !v.accepted && v.fallback.is_none())
            .count()
    });
    print(&plan, &env, verdicts.as_deref(), json).map_err(anyhow::Error::from)?;
    if rejected > 0 {
        return Err(
            anyhow::anyhow!("the verifier rejected {rejected} program(s); see above").into(),
        );
    }
    Ok(())
}

fn print(
    plan: &kernel::AttachPlan,
    env: &Environment,
    verdicts: Option<&[Verdict]>,
    json: bool,
) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(
            &mut out,
            &Report {
                environment: *env,
                plan,
                verifier: verdicts,
            },
        )?;
        return writeln!(out);
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
            "running as root: {}  /dev/kvm: {}  {}",
            yes(env.root),
            yes(env.dev_kvm),
            env.kallsyms_line()
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
    if let Some(verdicts) = verdicts {
        let ok = verdicts.iter().filter(|v| v.accepted).count();
        w(
            &mut out,
            format!("\nverifier: {ok}/{} programs accepted", verdicts.len()),
        );
        for v in verdicts.iter().filter(|v| !v.accepted) {
            let verdict = match v.fallback {
                Some(kind) => format!("refused, falls back to {kind}:"),
                None => "REJECTED".to_owned(),
            };
            w(
                &mut out,
                format!(
                    "  {:<28} {verdict} {}",
                    v.program,
                    v.error.as_deref().unwrap_or("")
                ),
            );
        }
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
