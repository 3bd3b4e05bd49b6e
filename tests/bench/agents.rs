//! Several agents against one server, as a Kubernetes Indexed Job runs them: each with its
//! `JOB_COMPLETION_INDEX`, all starting together (`--start-at`), merged by `bench merge`;
//! and the rate search against `reverb serve`.

use super::series::serve_epoll;
use super::{REVERB, reverb};
use hdrhistogram::Histogram;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

fn decode(text: &str) -> Histogram<u64> {
    reverb::bench::decode_histogram(text).expect("histogram")
}

#[test]
fn three_agents_merge_exactly() {
    let server = serve_epoll();
    let dir = std::env::temp_dir().join(format!("reverb-bench-agents-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let start = SystemTime::now() + Duration::from_secs(2);
    let start_s = start
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("epoch")
        .as_secs_f64();
    let start_at = format!("{start_s:.3}");
    let agents: Vec<_> = (0..3)
        .map(|index| {
            let file = dir.join(format!("agent-{index}.json"));
            let out = std::fs::File::create(&file).expect("file");
            let child = Command::new(REVERB)
                .args([
                    "bench",
                    &server.addrs[0],
                    "--json",
                    "--conns",
                    "3",
                    "--duration",
                    "1",
                ])
                .args(["--warmup", "0.2", "--start-at", &start_at])
                .env("JOB_COMPLETION_INDEX", index.to_string())
                .stdout(out)
                .stderr(Stdio::null())
                .spawn()
                .expect("agent");
            (child, file)
        })
        .collect();
    let mut reports = Vec::new();
    let mut files = Vec::new();
    for (mut child, file) in agents {
        assert!(child.wait().expect("wait").success());
        let text = std::fs::read_to_string(&file).expect("report");
        reports.push(serde_json::from_str::<Value>(&text).expect("json"));
        files.push(file.to_string_lossy().to_string());
    }
    for (index, report) in reports.iter().enumerate() {
        assert_eq!(report["agent"], index, "{report}");
        // Each started its load at the common start time (to within a scheduling delay).
        let window = report["window_start_unix_s"].as_f64().expect("window");
        assert!((window - (start_s + 0.2)).abs() < 0.2, "{report}");
    }
    let mut args = vec!["bench", "merge", "--json"];
    args.extend(files.iter().map(String::as_str));
    let outcome = reverb(&args);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let merged = outcome.json();
    let sum = |field: &str| {
        reports
            .iter()
            .map(|r| r[field].as_u64().expect(field))
            .sum::<u64>()
    };
    assert_eq!(merged["msgs"].as_u64(), Some(sum("msgs")), "{merged}");
    assert_eq!(merged["conns"].as_u64(), Some(9));
    assert_eq!(merged["errors"].as_u64(), Some(0));
    // The merged percentiles are those of one histogram fed every sample.
    let mut all = decode(reports[0]["latency_histogram_ns"].as_str().expect("h"));
    for report in &reports[1..] {
        all.add(decode(report["latency_histogram_ns"].as_str().expect("h")))
            .expect("add");
    }
    assert_eq!(all.len(), merged["msgs"].as_u64().expect("msgs"));
    let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
    for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)] {
        assert_eq!(
            merged["latency_us"][name].as_f64(),
            Some(us(all.value_at_quantile(q))),
            "{name}: {merged}"
        );
    }
    assert_eq!(merged["latency_us"]["max"].as_f64(), Some(us(all.max())));
    let agents = merged["agents"].as_array().expect("agents");
    assert_eq!(agents.len(), 3);
    // Common window: all three measured together for nearly the whole second.
    let duration = merged["duration_s"].as_f64().expect("duration");
    assert!(duration > 0.8, "{merged}");
    let rates: f64 = reports
        .iter()
        .map(|r| r["msgs_per_s"].as_f64().expect("rate"))
        .sum();
    assert!((merged["msgs_per_s"].as_f64().expect("rate") - rates).abs() < 1e-6);
    // The table names each agent.
    let mut args = vec!["bench", "merge"];
    args.extend(files.iter().map(String::as_str));
    let table = reverb(&args).stdout;
    for index in 0..3 {
        assert!(table.contains(&format!("agent {index}:")), "{table}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn merge_refuses_what_is_not_a_report() {
    let dir = std::env::temp_dir().join(format!("reverb-bench-merge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("not.json");
    std::fs::write(&file, "{\"hello\": 1}").expect("write");
    let outcome = reverb(&["bench", "merge", &file.to_string_lossy()]);
    assert_eq!(outcome.code, 1);
    assert!(
        outcome.stderr.contains("not a reverb bench --json report"),
        "{}",
        outcome.stderr
    );
    let outcome = reverb(&["bench", "merge"]);
    assert_eq!(outcome.code, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rate_search_finds_a_rate_within_the_bound() {
    let server = serve_epoll();
    let outcome = reverb(&[
        "bench",
        &server.addrs[0],
        "--json",
        "--conns",
        "4",
        "--duration",
        "0.3",
        "--warmup",
        "0.1",
        "--rate",
        "500",
        "--slo",
        "p99=200ms",
    ]);
    let report = outcome.json();
    assert_eq!(outcome.code, 0, "{report}");
    let slo = &report["slo"];
    let steps = slo["steps"].as_array().expect("steps");
    assert!(!steps.is_empty() && steps.len() <= 12, "{slo}");
    assert_eq!(steps[0]["rate"], 500.0);
    let best = slo["best_rate"].as_f64().expect("best");
    for step in steps {
        let rate = step["rate"].as_f64().expect("rate");
        if step["passed"] == true {
            assert!(rate <= best, "{slo}");
        } else {
            assert!(rate > best, "{slo}");
            assert!(step["reason"].is_string(), "{slo}");
        }
    }
    assert_eq!(report["rate"], best, "the report is the best step's");
    // An impossible bound: nothing passes, the steps go down, exit 3.
    let outcome = reverb(&[
        "bench",
        &server.addrs[0],
        "--conns",
        "2",
        "--duration",
        "0.2",
        "--warmup",
        "0",
        "--rate",
        "64",
        "--slo",
        "p50=1ns",
    ]);
    assert_eq!(outcome.code, 3, "{}", outcome.stdout);
    assert!(
        outcome.stdout.contains("no rate tried met the bound"),
        "{}",
        outcome.stdout
    );
    assert!(
        outcome.stdout.contains("step  1: rate         64"),
        "{}",
        outcome.stdout
    );
}

/// The Job manifest validates against the Kubernetes schemas (offline, strict), and is
/// what the test above does: an Indexed Job, every agent at once, a common start time,
/// JSON on stdout.
#[test]
fn kubernetes_job_is_valid() {
    let manifest = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/bench-job.yaml"
    );
    let Ok(validated) = Command::new("kubernetes-validate")
        .args(["--strict", manifest])
        .output()
    else {
        println!(
            "SKIPPED: kubernetes-validate is not installed \
             (pip install kubernetes-validate; .ci/run installs it)"
        );
        return;
    };
    assert!(
        validated.status.success(),
        "{}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );
    let script = "import sys, yaml\n\
                  job = yaml.safe_load(open(sys.argv[1]))\n\
                  spec = job['spec']\n\
                  assert job['kind'] == 'Job', job['kind']\n\
                  assert spec['completionMode'] == 'Indexed'\n\
                  assert spec['completions'] == spec['parallelism']\n\
                  args = spec['template']['spec']['containers'][0]['args']\n\
                  assert args[0] == 'bench' and '--json' in args and '--start-at' in args, args\n";
    let checked = Command::new("python3")
        .args(["-c", script, manifest])
        .output()
        .expect("python3");
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
}
