//! The deployment files: the Kubernetes manifests validate against the schemas offline
//! and keep the promises the drain relies on; the systemd units pass `systemd-analyze`.

use std::process::Command;

const MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/reverb.yaml");

/// Runs a tool; `None` (skipped, with a message) when it is not installed outside CI.
fn run(tool: &str, args: &[&str]) -> Option<std::process::Output> {
    match Command::new(tool).args(args).output() {
        Ok(output) => Some(output),
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{tool} is needed ({e}); .ci/run installs it"
            );
            eprintln!("SKIPPED: {tool} is not installed ({e})");
            None
        }
    }
}

#[test]
fn kubernetes_manifests_validate_strictly() {
    let Some(output) = run("kubernetes-validate", &["--strict", MANIFEST]) else {
        return;
    };
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What the schemas cannot check: the grace period outlasts the preStop pause plus the
/// drain, probes hit the right paths, the pod runs non-root on a read-only root, and the
/// Service carries both TCP and UDP.
#[test]
fn kubernetes_deployment_keeps_the_drain_promises() {
    const SCRIPT: &str = r#"
import sys, yaml
docs = {d["kind"]: d for d in yaml.safe_load_all(open(sys.argv[1]))}
assert set(docs) == {"Deployment", "Service", "PodDisruptionBudget"}, set(docs)
pod = docs["Deployment"]["spec"]["template"]["spec"]
c = pod["containers"][0]
args = c["args"]
drain = float(args[args.index("--drain-timeout") + 1])
pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
grace = pod["terminationGracePeriodSeconds"]
assert grace > pause + drain, (grace, pause, drain)
assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
assert "--metrics" in args
assert pod["securityContext"]["runAsNonRoot"] is True
assert c["securityContext"]["readOnlyRootFilesystem"] is True
assert c["securityContext"]["allowPrivilegeEscalation"] is False
assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
protocols = {(p["port"], p["protocol"]) for p in docs["Service"]["spec"]["ports"]}
assert {(7007, "TCP"), (7007, "UDP")} <= protocols, protocols
"#;
    let Some(output) = run("python3", &["-c", SCRIPT, MANIFEST]) else {
        return;
    };
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn systemd_units_verify() {
    let dir = std::env::temp_dir().join(format!("reverb-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/systemd/");
    let service = std::fs::read_to_string(format!("{source}reverb.service")).unwrap();
    // systemd-analyze checks that ExecStart's binary exists: point it at the built one.
    let service = service.replace("/usr/local/bin/reverb", env!("CARGO_BIN_EXE_reverb"));
    std::fs::write(dir.join("reverb.service"), service).unwrap();
    std::fs::copy(format!("{source}reverb.socket"), dir.join("reverb.socket")).unwrap();
    let units = [dir.join("reverb.socket"), dir.join("reverb.service")];
    let units: Vec<&str> = units.iter().map(|p| p.to_str().unwrap()).collect();
    let Some(output) = run("systemd-analyze", &["verify", units[0], units[1]]) else {
        return;
    };
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
