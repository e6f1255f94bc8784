//! What the packages ship beside the binary, checked against the binary:
//! the man pages and completions it generates for the .deb, and the
//! Kubernetes DaemonSet's grants and flags. (`cargo xtask dist --check`
//! installs the .deb and runs the image on clean systems.)

#[path = "support/cli.rs"]
mod support;

use std::path::PathBuf;

use serde::Deserialize as _;
use serde_yaml_ng::Value;
use support::{run, tracer};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The subcommands `tracer --help` lists.
fn subcommands() -> Vec<String> {
    let help = run(tracer().arg("--help")).stdout;
    let list = help
        .split("Commands:\n")
        .nth(1)
        .expect("a Commands section")
        .split("\n\n")
        .next()
        .unwrap();
    list.lines()
        // "  name  Description"; wrapped description lines are indented more.
        .filter_map(|l| l.strip_prefix("  ")?.split(' ').next())
        .filter(|c| !c.is_empty() && *c != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn man_pages_cover_every_command_and_its_flags() {
    let subs = subcommands();
    assert!(subs.len() >= 5, "{subs:?}");
    assert!(
        !subs.contains(&"generate".to_owned()),
        "generate is internal"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = run(tracer().args(["generate", "man"]).arg(dir.path()));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let mut want = vec!["tracer.1".to_owned()];
    want.extend(subs.iter().map(|s| format!("tracer-{s}.1")));
    let mut have: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    have.sort();
    want.sort();
    assert_eq!(have, want);
    for sub in &subs {
        let page = std::fs::read_to_string(dir.path().join(format!("tracer-{sub}.1"))).unwrap();
        assert!(page.starts_with(".ie") || page.contains(".TH"), "{page}");
        assert!(page.contains(&format!("tracer\\-{sub}")), "{sub}: {page}");
        // Every long flag of `--help` is on the page (roff escapes '-').
        let help = run(tracer().args([sub.as_str(), "--help"])).stdout;
        for flag in help
            .split_whitespace()
            .filter(|w| w.starts_with("--") && w.len() > 2)
        {
            let flag = flag.trim_end_matches([',', '.', '=', ')']);
            let flag = flag.split(['=', '[', '<']).next().unwrap();
            if flag == "--help" || flag.len() < 3 {
                continue;
            }
            assert!(
                page.contains(&flag.replace('-', "\\-")),
                "tracer-{sub}.1 lacks {flag}"
            );
        }
    }
}

#[test]
fn completions_offer_every_command_in_each_shell() {
    let subs = subcommands();
    for shell in ["bash", "zsh", "fish"] {
        let out = run(tracer().args(["generate", "completion", shell]));
        assert_eq!(out.code, Some(0), "{shell}: {}", out.stderr);
        for sub in &subs {
            assert!(out.stdout.contains(sub.as_str()), "{shell} lacks {sub}");
        }
        assert!(out.stdout.contains("--min-severity"), "{shell}");
    }
    // The bash script is valid bash and completes a subcommand.
    let script = run(tracer().args(["generate", "completion", "bash"])).stdout;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tracer.bash");
    std::fs::write(&path, script).unwrap();
    let out = run(std::process::Command::new("bash").arg("-c").arg(format!(
        ". {}; complete -p tracer; COMP_WORDS=(tracer rep); COMP_CWORD=1; \
         _tracer tracer rep tracer; echo \"reply: ${{COMPREPLY[*]}}\"",
        path.display()
    )));
    assert!(
        out.stdout.contains("-F _tracer") && out.stdout.contains("reply: replay"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    let bad = run(tracer().args(["generate", "completion", "tcsh"]));
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
}

fn daemonset() -> Value {
    let text = std::fs::read_to_string(repo().join("dist/kubernetes/daemonset.yaml")).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .find(|doc| doc["kind"] == "DaemonSet")
        .expect("a DaemonSet in dist/kubernetes/daemonset.yaml")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_daemonset_grants_what_the_daemon_needs_and_no_more() {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], Value::from(true), "VMM pids are host pids");
    let containers = pod["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(strings(&sc["capabilities"]["add"]), ["BPF", "PERFMON"]);
    assert_eq!(sc["privileged"], Value::from(false));
    assert_eq!(sc["allowPrivilegeEscalation"], Value::from(false));
    assert_eq!(sc["readOnlyRootFilesystem"], Value::from(true));
    // Every mount is a hostPath the daemon reads or writes; read-only but
    // for the log.
    let volumes = pod["volumes"].as_sequence().unwrap();
    let host_path = |name: &Value| {
        volumes
            .iter()
            .find(|v| &v["name"] == name)
            .and_then(|v| v["hostPath"]["path"].as_str())
            .unwrap_or_else(|| panic!("volume {name:?} is not a hostPath"))
            .to_owned()
    };
    let mut mounts: Vec<(String, String, bool)> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| {
            (
                host_path(&m["name"]),
                m["mountPath"].as_str().unwrap().to_owned(),
                m["readOnly"] == true,
            )
        })
        .collect();
    mounts.sort();
    let own = |p: &str| (p.to_owned(), p.to_owned());
    let want = [
        (own("/sys/kernel/btf"), true),
        (own("/sys/kernel/tracing"), true),
        (own("/var/lib/kvm-root-tracer"), false),
    ];
    let want: Vec<_> = want.into_iter().map(|((h, m), ro)| (h, m, ro)).collect();
    assert_eq!(mounts, want);

    // The image is this version's, and its flags are the daemon's: they
    // pass --check-config (with the config and log paths of this checkout).
    let image = c["image"].as_str().unwrap();
    assert!(
        image.ends_with(&format!("/kvm-root-tracer:{}", env!("CARGO_PKG_VERSION"))),
        "{image}"
    );
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = strings(&c["args"])
        .into_iter()
        .map(|a| match a.as_str() {
            "/etc/kvm-root-tracer/config.toml" => {
                repo().join("dist/config.toml").display().to_string()
            }
            "/var/lib/kvm-root-tracer/log" => dir.path().display().to_string(),
            "$(NODE_NAME)" => "node-1".into(),
            _ => a,
        })
        .collect();
    assert_eq!(args[0], "run");
    let out = run(tracer().args(&args).arg("--check-config"));
    assert_eq!(out.code, Some(0), "{args:?}: {}", out.stderr);
    let port = c["ports"][0]["containerPort"].as_u64().unwrap();
    assert!(
        args.iter().any(|a| a.ends_with(&format!(":{port}"))),
        "the metrics listen address must use the container port {port}: {args:?}"
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"],
        Value::from("/healthz")
    );
}
