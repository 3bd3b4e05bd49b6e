//! The report as a terminal table, as Markdown, and as files in `--out`.

use super::{CompareReport, ModelResult, Point};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;

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
        out += "\n![msgs/s and p99 against connections](compare.svg)\n";
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

    /// Writes `compare.json`, `compare.md` and `compare.svg` into `dir` (created if needed).
    ///
    /// # Errors
    ///
    /// The OS error of creating the directory or writing a file, naming the path.
    pub fn write_files(&self, dir: &Path) -> io::Result<()> {
        let named = |path: &Path, e: io::Error| {
            io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display()))
        };
        fs::create_dir_all(dir).map_err(|e| named(dir, e))?;
        let json = serde_json::to_string_pretty(self).map_err(io::Error::other)? + "\n";
        for (name, text) in [
            ("compare.json", json),
            ("compare.md", self.to_markdown()),
            ("compare.svg", super::svg::render(self)),
        ] {
            let path = dir.join(name);
            fs::write(&path, text).map_err(|e| named(&path, e))?;
        }
        Ok(())
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
    let has_answers = point.bench.as_ref().is_some_and(|b| b.msgs > 0);
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
