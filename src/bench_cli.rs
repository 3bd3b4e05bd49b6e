//! `reverb bench` as a command: progress on a terminal, the report on stdout, and the
//! exit codes of docs/cli.md; `reverb bench merge` combines agents' reports.

use crate::cli::{BenchArgs, BenchCommand, MergeArgs};
use reverb::bench::{BenchReport, Phase, Progress};
use std::io::Write;
use std::process::ExitCode;

/// Runs `reverb bench` (or `reverb bench merge`).
pub fn run(args: BenchArgs) -> ExitCode {
    if let Some(BenchCommand::Merge(merge)) = args.command {
        return run_merge(&merge);
    }
    let Some(addr) = args.addr.clone() else {
        crate::usage_error("bench", "the server address ADDR is required", None);
    };
    let addr = crate::cli::with_tls_verify(addr, args.ca.as_ref(), args.insecure)
        .unwrap_or_else(|e| crate::usage_error("bench", e, None));
    let agent =
        reverb::bench::agent_from_env().unwrap_or_else(|e| crate::usage_error("bench", e, None));
    let config = args.config(agent);
    if let Err(e) = config.validate(&addr) {
        crate::usage_error("bench", e, None);
    }
    if let Err(e) = reverb::sys::raise_open_file_limit() {
        eprintln!("reverb: cannot raise the open-file limit: {e}");
    }
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(crate::progress_bar);
    let show = |progress: Progress| {
        if let Some(bar) = &bar {
            show_progress(bar, &progress);
        }
    };
    let result = match &args.slo {
        Some(slo) => reverb::bench::search_rate(&addr, &config, slo, |step| {
            if let Some(bar) = &bar {
                bar.println(format!(
                    "rate {:.0} msgs/s: p{} {:.1} us, {}",
                    step.rate,
                    slo.percentile,
                    step.latency_us,
                    step.reason.as_deref().unwrap_or("pass")
                ));
            }
        }),
        None => reverb::bench::run_with_progress(&addr, &config, show),
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(report) => print(&report, args.json),
        Err(e) => crate::fail(format!("bench {addr}: {e}")),
    }
}

fn show_progress(bar: &indicatif::ProgressBar, progress: &Progress) {
    let phase = progress.phase.name();
    if matches!(progress.phase, Phase::Connecting | Phase::Waiting) {
        bar.set_length(progress.conns.max(1));
        bar.set_position(progress.established + progress.connect_failed);
        bar.set_message(format!(
            "{phase}: {} of {} established, {} failed",
            progress.established, progress.conns, progress.connect_failed
        ));
        return;
    }
    let total = progress.total.as_millis().max(1) as u64;
    bar.set_length(total);
    bar.set_position((progress.elapsed.as_millis() as u64).min(total));
    bar.set_message(format!("{phase}, {} verified", progress.verified));
}

fn run_merge(args: &MergeArgs) -> ExitCode {
    match reverb::bench::merge(&args.files) {
        Ok(report) => print(&report, args.json),
        Err(e) => crate::fail(format!("bench merge: {e}")),
    }
}

fn print(report: &BenchReport, json: bool) -> ExitCode {
    let text = if json {
        report.to_json() + "\n"
    } else {
        report.to_table()
    };
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::from(1);
    }
    ExitCode::from(report.exit_code())
}
