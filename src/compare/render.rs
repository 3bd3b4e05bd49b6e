//! The report as a terminal table, as Markdown, and as files in `--out`.

use super::child::{self, Stopped};
use super::{CompareReport, IDLE_CONNS, IDLE_CPU_LIMIT_PERCENT, ModelResult, Point, ProbeResult};
use crate::bench::BenchReport;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Column headers, shared by the terminal table and the Markdown one.
const HEADERS: [&str; 9] = [
    "model",
    "conns",
    "msgs/s",
    "p99 µs",
    "CPU %",
    "CPU µs/msg",
    "RSS MiB",
    "idle CPU %",
    "limit",
];

impl CompareReport {
    /// One row per model and connection count, as cells.
    fn rows(&self) -> Vec<[String; 9]> {
        let mut rows = Vec::new();
        for model in &self.models {
            if model.points.is_empty() {
                rows.push(row(model, None, true));
            }
            for (index, point) in model.points.iter().enumerate() {
                rows.push(row(model, Some(point), index == 0));
            }
        }
        rows
    }

    /// The table for a terminal: aligned columns, then the skipped models.
    pub fn to_table(&self) -> String {
        let rows = self.rows();
        let mut widths = HEADERS.map(|h| h.chars().count());
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut text = String::new();
            for (column, cell) in cells.iter().enumerate() {
                let pad = widths[column].saturating_sub(cell.chars().count());
                let is_last = column == cells.len() - 1;
                if column == 0 || is_last {
                    text += cell;
                    if !is_last {
                        text += &" ".repeat(pad);
                    }
                } else {
                    text += &" ".repeat(pad);
                    text += cell;
                }
                if !is_last {
                    text += "  ";
                }
            }
            text.trim_end().to_string() + "\n"
        };
        let mut out = line(&HEADERS.map(str::to_string));
        for row in &rows {
            out += &line(row);
        }
        out += &self.footer();
        out
    }

    /// The whole `compare.md`: command, machine, table, skipped models, plot.
    pub fn to_markdown(&self) -> String {
        let mut out = String::from("# reverb compare\n\n");
        if let Some(command) = &self.command {
            let _ = writeln!(out, "Made with `{command}`.\n");
        }
        let _ = writeln!(out, "{}\n", self.settings_line());
        let _ = writeln!(out, "| {} |", HEADERS.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            HEADERS
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 || i == 8 { "---|" } else { "---:|" })
                .collect::<String>()
        );
        for row in self.rows() {
            let cells: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        out += "\n";
        out += &self.footer();
        out += "\n![msgs/s, p99 and server CPU per message against connections](compare.svg)\n";
        out
    }

    /// What every point used, and where it ran.
    pub fn settings_line(&self) -> String {
        let s = &self.settings;
        let m = &self.machine;
        let pinning = match (m.server_cpu, m.load_cpu) {
            (Some(server), Some(load)) => format!("server on CPU {server}, load on CPU {load}"),
            _ => "not pinned".to_string(),
        };
        format!(
            "{} B messages, depth {}, {} s measured after {} s warmup per point; idle CPU over \
             {} s with {} silent connections; {} CPUs ({pinning}); Linux {}; load average at \
             start {}.",
            s.size,
            s.depth,
            s.duration_s,
            s.warmup_s,
            s.idle_window_s,
            s.idle_conns,
            m.cpus,
            m.kernel,
            m.loadavg_at_start
                .split(' ')
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        )
    }

    fn footer(&self) -> String {
        let mut out = String::new();
        if !self.skipped.is_empty() {
            let list: Vec<String> = self
                .skipped
                .iter()
                .map(|s| format!("{} ({})", s.model, s.reason))
                .collect();
            let _ = writeln!(out, "skipped: {}", list.join(", "));
        }
        let _ = writeln!(
            out,
            "CPU % and RSS are the server's (all threads and child processes; RSS is \
             proportional, so pages a fork shares count once); {:.0} s in all.",
            self.elapsed_s
        );
        out
    }

    /// Writes `compare.json`, `compare.md` and `compare.svg` into `dir` (created if needed)
    /// and returns their paths, so the caller can say where they are.
    ///
    /// # Errors
    ///
    /// The OS error of creating the directory or writing a file, naming the path.
    pub fn write_files(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let named = |path: &Path, e: io::Error| {
            io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display()))
        };
        fs::create_dir_all(dir).map_err(|e| named(dir, e))?;
        let json = serde_json::to_string_pretty(self).map_err(io::Error::other)? + "\n";
        let mut written = Vec::new();
        for (name, text) in [
            ("compare.json", json),
            ("compare.md", self.to_markdown()),
            ("compare.svg", super::svg::render(self)),
        ] {
            let path = dir.join(name);
            fs::write(&path, text).map_err(|e| named(&path, e))?;
            written.push(path);
        }
        Ok(written)
    }
}

fn row(model: &ModelResult, point: Option<&Point>, is_first: bool) -> [String; 9] {
    let mut limit: Vec<String> = Vec::new();
    if is_first {
        limit.extend(model.limits.iter().cloned());
        if model.limits.is_empty() {
            let held = [model.descriptor_probe, model.concurrency_probe]
                .into_iter()
                .flatten()
                .map(|found| found.conns)
                .max();
            if let Some(held) = held {
                limit.push(format!("none found ({held} clients held open, all served)"));
            }
        }
    }
    if let Some(note) = point.and_then(|p| p.note.clone()) {
        limit.push(format!("at {} conns: {note}", point.map_or(0, |p| p.conns)));
    }
    let dash = || "-".to_string();
    let name = if is_first {
        model.model.clone()
    } else {
        String::new()
    };
    let idle = if is_first {
        model
            .idle_cpu_percent
            .map_or_else(dash, |v| format!("{v:.1}"))
    } else {
        String::new()
    };
    let Some(point) = point else {
        return [
            name,
            dash(),
            dash(),
            dash(),
            dash(),
            dash(),
            dash(),
            idle,
            limit.join("; "),
        ];
    };
    let has_answers = point.msgs_per_s > 0.0;
    [
        name,
        point.conns.to_string(),
        format!("{:.0}", point.msgs_per_s),
        if has_answers {
            format_latency(point.p99_us)
        } else {
            dash()
        },
        point
            .server_cpu_percent
            .map_or_else(dash, |v| format!("{v:.0}")),
        point
            .cpu_us_per_msg
            .map_or_else(dash, |v| format!("{v:.1}")),
        point
            .memory_bytes
            .map_or_else(dash, |b| format!("{:.1}", b as f64 / 1048576.0)),
        idle,
        limit.join("; "),
    ]
}

fn format_latency(us: f64) -> String {
    if us < 100.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

/// The note of a point whose server had to be killed.
pub(super) const HUNG: &str = "did not finish";

/// A point's problems in plain words.
pub(super) fn describe_point(report: &BenchReport, unanswered_conns: u64) -> Option<String> {
    let mut parts = Vec::new();
    let detail = report.error_detail;
    if unanswered_conns > 0 {
        parts.push(format!(
            "{} of {} clients answered",
            u64::from(report.conns) - unanswered_conns,
            report.conns
        ));
    }
    if detail.connect_failed > 0 {
        parts.push(format!("{} connects failed", detail.connect_failed));
    }
    if detail.closed_early + detail.reset > 0 {
        parts.push(format!(
            "{} connections closed or reset",
            detail.closed_early + detail.reset
        ));
    }
    if report.mismatches > 0 {
        parts.push(format!("{} WRONG BYTES", report.mismatches));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// The model's limits, from the measurements.
pub(super) fn describe_limits(result: &ModelResult, stopped: Stopped) -> Vec<String> {
    let mut limits = Vec::new();
    if let Some(found) = result.concurrency_probe {
        if !found.is_complete() {
            limits.push(describe_probe(&found, false));
        }
    }
    if let Some(found) = result.descriptor_probe {
        if !found.is_complete() {
            limits.push(describe_probe(&found, true));
        }
    }
    if let Some(idle) = result.idle_cpu_percent {
        if idle >= IDLE_CPU_LIMIT_PERCENT {
            limits.push(format!(
                "burns {idle:.0}% of a core while idle ({IDLE_CONNS} silent clients)"
            ));
        }
    }
    if let Some(point) = result
        .points
        .iter()
        .find(|p| p.note.as_deref().is_some_and(|n| n.starts_with(HUNG)))
    {
        limits.push(format!("hung at {} conns (killed)", point.conns));
    }
    let wrong: u64 = result
        .points
        .iter()
        .filter_map(|p| p.bench.as_ref().map(|b| b.mismatches))
        .sum();
    if wrong > 0 {
        limits.push(format!("returned {wrong} WRONG BYTES (a bug)"));
    }
    match stopped {
        Stopped::Clean => {}
        Stopped::Failed(code) => limits.push(format!(
            "exited {} on SIGTERM",
            code.map_or("by a signal".to_string(), |c| format!("with code {c}"))
        )),
        Stopped::Killed => limits.push(format!(
            "ignored SIGTERM for {} s (killed)",
            child::STOP_TIMEOUT.as_secs()
        )),
        // A point that hung has already said so; its server was killed on purpose.
        Stopped::DiedEarly(_) if limits.iter().any(|l| l.starts_with("hung")) => {}
        Stopped::DiedEarly(code) => limits.push(format!(
            "the server died during the run ({})",
            code.map_or("killed by a signal".to_string(), |c| format!("exit {c}"))
        )),
    }
    limits
}

/// A probe that was not fully answered, in plain words.
fn describe_probe(found: &ProbeResult, is_descriptor_probe: bool) -> String {
    let n = found.conns;
    let served = found.answered;
    if found.wrong > 0 {
        return format!("{} of {n} answers had wrong bytes", found.wrong);
    }
    if is_descriptor_probe && found.closed > 0 && (1000..1024).contains(&served) {
        return format!(
            "cannot watch fds >= 1024: {served} of {n} open clients served, {} closed",
            found.closed
        );
    }
    let mut text = if found.waiting > 0 && found.closed == 0 {
        format!("serves {served} of {n} clients at a time; the others wait")
    } else {
        format!("serves {served} of {n} clients held open at once")
    };
    if found.closed > 0 {
        text += &format!(", {} closed", found.closed);
    }
    if found.waiting > 0 && found.closed > 0 {
        text += &format!(", {} waiting", found.waiting);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::super::{Machine, ModelResult, Point, ProbeResult, Settings, Skipped};
    use super::*;

    fn point(conns: u32, msgs_per_s: f64, unanswered_conns: u64, note: Option<&str>) -> Point {
        Point {
            conns,
            msgs_per_s,
            p50_us: 40.0,
            p99_us: 95.5,
            server_cpu_percent: Some(50.0),
            cpu_us_per_msg: Some(12.34),
            memory_bytes: Some(2 * 1048576),
            processes: 1,
            unanswered_conns,
            note: note.map(str::to_string),
            bench: None,
        }
    }

    fn report() -> CompareReport {
        let all_served = ProbeResult {
            conns: 1100,
            connected: 1100,
            answered: 1100,
            ..ProbeResult::default()
        };
        CompareReport {
            settings: Settings {
                conns: vec![1, 10],
                size: 64,
                depth: 1,
                duration_s: 1.0,
                warmup_s: 0.25,
                idle_conns: 10,
                idle_window_s: 1.0,
                descriptor_probe_conns: Some(1100),
            },
            machine: Machine {
                cpus: 2,
                server_cpu: Some(0),
                load_cpu: Some(1),
                kernel: "6.1".to_string(),
                loadavg_at_start: "0.50 0.40 0.30 1/100 42".to_string(),
            },
            models: vec![
                ModelResult {
                    model: "blocking".to_string(),
                    idle_cpu_percent: Some(0.0),
                    idle_memory_bytes: Some(1 << 20),
                    points: vec![
                        point(1, 20000.0, 0, None),
                        point(10, 19000.0, 9, Some("1 of 10 clients answered")),
                    ],
                    concurrency_probe: None,
                    descriptor_probe: None,
                    limits: vec!["serves 1 of 10 clients at a time; the others wait".into()],
                    stopped: "clean".to_string(),
                },
                ModelResult {
                    model: "epoll".to_string(),
                    idle_cpu_percent: Some(0.1),
                    idle_memory_bytes: Some(1 << 20),
                    points: vec![point(1, 25000.0, 0, None), point(10, 90000.0, 0, None)],
                    concurrency_probe: None,
                    descriptor_probe: Some(all_served),
                    limits: Vec::new(),
                    stopped: "clean".to_string(),
                },
            ],
            skipped: vec![Skipped {
                model: "uring".to_string(),
                reason: "io_uring is disabled".to_string(),
            }],
            elapsed_s: 12.0,
            command: Some("reverb compare --conns 1,10".to_string()),
        }
    }

    #[test]
    fn table_has_a_row_per_point_and_says_what_is_missing() {
        let table = report().to_table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("model"), "{table}");
        assert!(lines[1].starts_with("blocking"));
        assert!(lines[1].ends_with("serves 1 of 10 clients at a time; the others wait"));
        assert!(lines[2].ends_with("at 10 conns: 1 of 10 clients answered"));
        assert!(lines[3].contains("none found (1100 clients held open, all served)"));
        // Numbers line up under their headers (right-aligned).
        let column_end = lines[0].find("msgs/s").expect("header") + "msgs/s".len();
        assert_eq!(&lines[1][column_end - 5..column_end], "20000");
        assert_eq!(&lines[4][column_end - 5..column_end], "90000");
        assert!(table.contains("skipped: uring (io_uring is disabled)"));
    }

    #[test]
    fn markdown_and_svg() {
        let report = report();
        let markdown = report.to_markdown();
        assert!(markdown.contains("Made with `reverb compare --conns 1,10`."));
        assert!(markdown.contains("| blocking | 1 | 20000 | 95.5 | 50 | 12.3 | 2.0 | 0.0 |"));
        assert!(markdown.contains("load average at start 0.50 0.40 0.30."));
        let svg = super::super::svg::render(&report);
        assert_eq!(svg.matches("<polyline").count(), 6);
        // blocking at 10 connections left clients unanswered: a hollow marker.
        assert!(svg.contains(r##"fill="#ffffff" stroke="#000000""##));
        assert!(svg.contains("<title>epoll at 10 conns: 90k</title>"));
    }

    fn probe(conns: usize, answered: usize, closed: usize, waiting: usize) -> ProbeResult {
        ProbeResult {
            conns,
            connected: conns,
            answered,
            closed,
            waiting,
            wrong: 0,
        }
    }

    #[test]
    fn limits_in_plain_words() {
        assert_eq!(
            describe_probe(&probe(100, 1, 0, 99), false),
            "serves 1 of 100 clients at a time; the others wait"
        );
        assert_eq!(
            describe_probe(&probe(1100, 1019, 81, 0), true),
            "cannot watch fds >= 1024: 1019 of 1100 open clients served, 81 closed"
        );
        assert_eq!(
            describe_probe(&probe(1100, 900, 100, 100), true),
            "serves 900 of 1100 clients held open at once, 100 closed, 100 waiting"
        );
    }
}
