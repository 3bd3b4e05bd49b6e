//! `reverb compare` through the binary: a short run of three models, checked through the
//! files it writes. `blocking` is in the list because its limit must come out as a result
//! (in plain words, bounded in time), not as a failure or a hang.

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The whole run must end well within this, or the test fails (and kills it).
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("reverb-compare-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn run_compare(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_reverb"))
        .arg("compare")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start reverb compare");
    let started = Instant::now();
    loop {
        if let Some(_status) = child.try_wait().expect("try_wait") {
            break;
        }
        if started.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("reverb compare did not finish within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().expect("collect output");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn model<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["models"]
        .as_array()
        .expect("models is an array")
        .iter()
        .find(|m| m["model"] == name)
        .unwrap_or_else(|| panic!("model {name} missing from {report:#}"))
}

#[test]
fn short_compare_of_three_models_writes_valid_files() {
    let dir = out_dir("three");
    let started = Instant::now();
    let (status, stdout, stderr) = run_compare(&[
        "--models",
        "threaded,pool,blocking",
        "--conns",
        "1,2",
        "--duration",
        // A window long enough that a starved machine still serves messages in it: with a
        // load average of 30 on 2 cores a wake-up waits 50-175 ms, so a 0.3 s window
        // held 3 messages and its two CPU samples (taken every ~100 ms) saw no server
        // CPU between them.
        "1",
        "--out",
        dir.to_str().expect("utf-8 temp dir"),
    ]);
    assert!(
        status.success(),
        "exit {status:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(started.elapsed() < RUN_TIMEOUT);
    // stderr is not a terminal here: no progress bar.
    assert!(
        !stderr.contains('\r'),
        "progress bar drawn on a pipe: {stderr:?}"
    );

    let json = std::fs::read_to_string(dir.join("compare.json")).expect("compare.json");
    let report: Value = serde_json::from_str(&json).expect("compare.json is JSON");
    assert_eq!(report["settings"]["conns"], serde_json::json!([1, 2]));
    assert_eq!(report["settings"]["duration_s"], 1.0);
    let names: Vec<&str> = report["models"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["model"].as_str())
        .collect();
    assert_eq!(names, ["threaded", "pool", "blocking"], "ladder order kept");

    for name in ["threaded", "pool"] {
        let m = model(&report, name);
        let points = m["points"].as_array().expect("points");
        assert_eq!(points.len(), 2, "{name}: one point per count");
        for (point, conns) in points.iter().zip([1, 2]) {
            assert_eq!(point["conns"], conns);
            assert!(
                point["msgs_per_s"].as_f64().expect("msgs_per_s") > 0.0,
                "{point:#}"
            );
            assert!(point["p99_us"].as_f64().expect("p99_us") > 0.0);
            assert!(point["memory_bytes"].as_u64().expect("memory") > 100_000);
            assert_eq!(point["bench"]["errors"], 0, "{name}: {point:#}");
            assert_eq!(point["bench"]["mismatches"], 0);
        }
        // Server CPU needs two /proc samples inside the 1 s window, which a loaded machine
        // may not give every point; it must be there for at least one.
        let with_cpu = points
            .iter()
            .filter(|p| {
                p["server_cpu_percent"].as_f64().is_some_and(|v| v > 0.0)
                    && p["cpu_us_per_msg"].as_f64().is_some_and(|v| v > 0.0)
            })
            .count();
        assert!(with_cpu >= 1, "{name}: server CPU measured: {points:#?}");
        let idle = m["idle_cpu_percent"].as_f64().expect("idle cpu");
        assert!((0.0..20.0).contains(&idle), "{name} idle cpu {idle}");
        assert_eq!(m["stopped"], "clean", "{name} stops on SIGTERM");
    }
    // threaded answers everyone, even the descriptor probe's 1100 connections.
    let threaded = model(&report, "threaded");
    assert_eq!(threaded["limits"], serde_json::json!([]), "{threaded:#}");
    assert!(stdout.contains("none found (1100 clients held open, all served)"));
    assert_eq!(threaded["descriptor_probe"]["answered"], 1100);
    // pool's size (16 by default) is found by measurement.
    let pool = model(&report, "pool");
    let pool_limits = pool["limits"].to_string();
    assert!(
        pool_limits.contains("serves 16 of 1100 clients"),
        "{pool_limits}"
    );
    // blocking serves one client; the second waits, and that is a result, not an error.
    let blocking = model(&report, "blocking");
    let blocking_limits = blocking["limits"].to_string();
    assert!(
        blocking_limits.contains("serves 1 of 2 clients at a time"),
        "{blocking_limits}"
    );
    assert_eq!(blocking["points"][1]["unanswered_conns"], 1);
    assert!(
        blocking["points"][1]["msgs_per_s"]
            .as_f64()
            .expect("msgs/s")
            > 100.0
    );

    // The table on stdout names every model and its limit.
    for needle in [
        "model",
        "msgs/s",
        "threaded",
        "pool",
        "blocking",
        "serves 1 of 2",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }
    let markdown = std::fs::read_to_string(dir.join("compare.md")).expect("compare.md");
    assert!(
        markdown.contains("| model | conns | msgs/s |"),
        "{markdown}"
    );
    assert!(markdown.contains("compare.svg"));
    let svg = std::fs::read_to_string(dir.join("compare.svg")).expect("compare.svg");
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(
        svg.contains("reverb compare: models threaded, pool, blocking"),
        "the title names what was run: {svg}"
    );
    assert!(
        svg.contains("$ reverb compare --models threaded,pool,blocking"),
        "{svg}"
    );
    let svg_path = dir.join("compare.svg");
    assert!(
        stdout.contains(&format!("wrote {}", dir.join("compare.json").display()))
            && stdout.contains(&svg_path.display().to_string()),
        "says where the files went: {stdout}"
    );
    // One line per model in each of the three panels (msgs/s, p99, CPU per message).
    // The CPU panel needs two /proc samples inside a 1 s window, which a loaded machine
    // may not give every point; the other two panels always have their lines.
    let lines = svg.matches("<polyline").count();
    assert!((6..=9).contains(&lines), "{lines} lines: {svg}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_values_are_usage_errors() {
    let (status, _, stderr) = run_compare(&["--conns", "0", "--out", "/nonexistent/never"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--conns"), "{stderr}");
}
