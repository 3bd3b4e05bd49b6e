//! `compare.svg`, written by hand: throughput, p99 latency and server CPU per message
//! against connection count, one line per model, side by side. CPU per message is the
//! panel to trust on a busy machine: it does not depend on the share of a core the server
//! got. An axis is logarithmic when its values span more than
//! [`LOG_SPAN`]; otherwise it is linear from zero, which reads more easily.

use super::{CompareReport, ModelResult, Point};
use crate::models::Model;
use std::fmt::Write as _;

/// Above this max/min ratio an axis goes logarithmic.
const LOG_SPAN: f64 = 20.0;
const TITLE_Y: f64 = 30.0;
const WIDTH: f64 = 1160.0;
const PLOT_TOP: f64 = 110.0;
const PLOT_BOTTOM: f64 = 410.0;
const PANEL_LEFT: [f64; 3] = [70.0, 455.0, 840.0];
const PANEL_WIDTH: f64 = 280.0;
const LEGEND_TOP: f64 = 475.0;
const LEGEND_COLUMNS: usize = 6;
const LEGEND_COLUMN_WIDTH: f64 = 155.0;
const LEGEND_ROW_HEIGHT: f64 = 22.0;

/// Each model keeps its colour and dash from run to run (ladder order). The colours are the
/// Okabe-Ito palette (Okabe and Ito, "Color Universal Design", 2002), which readers with
/// every common form of colour blindness can tell apart; its yellow is left out, too pale on
/// white. Seven colours cannot mark eleven models, so the dash tells apart two models of one
/// colour: the four scalable models are solid, the lower rungs dashed or dotted.
const STYLES: [(&str, &str); 11] = [
    ("#000000", "2 3"), // blocking: black, dotted
    ("#E69F00", "8 4"), // threaded: orange, dashed
    ("#56B4E9", "8 4"), // pool: sky blue, dashed
    ("#000000", "8 4"), // forking: black, dashed
    ("#CC79A7", "2 3"), // busy-poll: reddish purple, dotted
    ("#009E73", "2 3"), // select: bluish green, dotted
    ("#E69F00", "2 3"), // poll: orange, dotted
    ("#0072B2", ""),    // epoll: blue
    ("#D55E00", ""),    // async: vermillion
    ("#009E73", ""),    // tokio: bluish green
    ("#CC79A7", ""),    // uring: reddish purple
];

fn style(model: &str) -> (&'static str, &'static str) {
    Model::ALL
        .iter()
        .position(|m| m.name() == model)
        .map_or(("#444444", ""), |i| STYLES[i])
}

/// What a panel plots of a point (`None`: nothing to plot).
type ValueOf = fn(&Point) -> Option<f64>;

/// A mapping from values to pixels along one axis.
#[derive(Clone, Copy)]
struct Scale {
    low: f64,
    high: f64,
    is_log: bool,
    /// Pixel positions of `low` and `high`.
    from: f64,
    to: f64,
}

impl Scale {
    fn new(values: &[f64], from: f64, to: f64, force_log: bool) -> Scale {
        let positive: Vec<f64> = values.iter().copied().filter(|v| *v > 0.0).collect();
        let min = positive.iter().copied().fold(f64::INFINITY, f64::min);
        let max = positive.iter().copied().fold(0.0, f64::max);
        if positive.is_empty() {
            return Scale {
                low: 0.0,
                high: 1.0,
                is_log: false,
                from,
                to,
            };
        }
        if force_log || max / min > LOG_SPAN {
            let (mut low, mut high) = (min, max);
            if force_log {
                // The x axis: the connection counts themselves, with a little margin.
                low /= 1.25;
                high *= 1.25;
            } else {
                low = 10f64.powf(min.log10().floor());
                high = 10f64.powf(max.log10().ceil());
            }
            if high <= low {
                high = low * 10.0;
            }
            Scale {
                low,
                high,
                is_log: true,
                from,
                to,
            }
        } else {
            let step = nice_step(max / 5.0);
            Scale {
                low: 0.0,
                high: (max / step).ceil().max(1.0) * step,
                is_log: false,
                from,
                to,
            }
        }
    }

    fn at(&self, value: f64) -> f64 {
        let share = if self.is_log {
            (value.max(self.low).log10() - self.low.log10())
                / (self.high.log10() - self.low.log10())
        } else {
            (value - self.low) / (self.high - self.low)
        };
        self.from + share * (self.to - self.from)
    }

    /// Grid values: decades (with 2 and 5 when there are few) or even linear steps.
    fn ticks(&self) -> Vec<f64> {
        if self.is_log {
            let decades = (self.high / self.low).log10().round() as i32;
            let mut ticks = Vec::new();
            let mut decade = 10f64.powf(self.low.log10().floor());
            while decade <= self.high * 1.0001 {
                for factor in [1.0, 2.0, 5.0] {
                    let value = decade * factor;
                    let wanted = factor == 1.0 || decades <= 2;
                    if wanted && value >= self.low * 0.9999 && value <= self.high * 1.0001 {
                        ticks.push(value);
                    }
                }
                decade *= 10.0;
            }
            ticks
        } else {
            let step = nice_step((self.high - self.low) / 5.0);
            let count = ((self.high - self.low) / step).round() as usize;
            (0..=count).map(|i| self.low + step * i as f64).collect()
        }
    }
}

/// 1, 2 or 5 times a power of ten, at least `rough`.
fn nice_step(rough: f64) -> f64 {
    if rough.is_nan() || rough <= 0.0 {
        return 1.0;
    }
    let power = 10f64.powf(rough.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|f| f * power)
        .find(|step| *step >= rough)
        .unwrap_or(10.0 * power)
}

/// `1500` -> `1.5k`, `20000` -> `20k`, `3000000` -> `3M`.
fn short_number(value: f64) -> String {
    let (scaled, suffix) = if value >= 1e6 {
        (value / 1e6, "M")
    } else if value >= 1e3 {
        (value / 1e3, "k")
    } else {
        (value, "")
    };
    let text = if scaled >= 10.0 || scaled.fract() == 0.0 {
        format!("{scaled:.0}")
    } else {
        format!("{scaled:.1}")
    };
    text + suffix
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The title names what was run: the models, the load, and the command when it is known.
/// Each line is (baseline y, font size, colour, text).
fn headings(report: &CompareReport) -> Vec<(f64, f64, &'static str, String)> {
    let names: Vec<&str> = report.models.iter().map(|m| m.model.as_str()).collect();
    let models = match names.as_slice() {
        [] => "no model".to_string(),
        [one] => format!("model {one}"),
        many if many.len() == Model::ALL.len() => {
            format!(
                "all {} models, {} to {}",
                many.len(),
                many[0],
                many[many.len() - 1]
            )
        }
        many => format!("models {}", many.join(", ")),
    };
    let s = &report.settings;
    let conns: Vec<String> = s.conns.iter().map(u32::to_string).collect();
    let mut load = format!(
        "{} B echoes at {} connections, {} in flight per connection, {} s measured per point",
        s.size,
        conns.join(", "),
        s.depth,
        s.duration_s
    );
    if report.machine.server_cpu.is_some() {
        load += "; server and load on separate CPUs";
    }
    let mut lines = vec![
        (
            TITLE_Y,
            18.0,
            "#000000",
            format!("reverb compare: {models}"),
        ),
        (52.0, 13.0, "#555555", load),
    ];
    if let Some(command) = &report.command {
        lines.push((70.0, 12.0, "#555555", format!("$ {command}")));
    }
    lines
}

/// Shortens `text` with an ellipsis so that it fits the picture's width at `font_size`.
/// Glyph widths are estimated (0.6 em, a little over Helvetica's average), so a line that
/// fits here fits in a browser.
fn fit(text: &str, font_size: f64) -> String {
    let max_chars = ((WIDTH - 40.0) / (font_size * 0.6)) as usize;
    if text.chars().count() <= max_chars {
        return text.to_string();
    }
    let kept: String = text.chars().take(max_chars.saturating_sub(1)).collect();
    kept + "…"
}

/// Renders the report's plot.
pub fn render(report: &CompareReport) -> String {
    let legend_rows = report.models.len().div_ceil(LEGEND_COLUMNS).max(1);
    let height = LEGEND_TOP + legend_rows as f64 * LEGEND_ROW_HEIGHT + 40.0;
    let mut svg = String::new();
    let s = &report.settings;
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="Helvetica, Arial, sans-serif" font-size="13">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>"##
    );
    for (y, size, colour, text) in headings(report) {
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{y}" font-size="{size}" fill="{colour}"{weight} text-anchor="middle">{}</text>"##,
            WIDTH / 2.0,
            escape(&fit(&text, size)),
            weight = if y == TITLE_Y {
                r#" font-weight="bold""#
            } else {
                ""
            }
        );
    }

    let conns: Vec<f64> = s.conns.iter().map(|&c| f64::from(c)).collect();
    let panels: [(&str, ValueOf); 3] = [
        ("throughput (msgs/s, higher is better)", |p| {
            (p.msgs_per_s > 0.0).then_some(p.msgs_per_s)
        }),
        ("p99 round trip (µs, lower is better)", |p| {
            (p.msgs_per_s > 0.0 && p.p99_us > 0.0).then_some(p.p99_us)
        }),
        ("server CPU per message (µs, lower is better)", |p| {
            p.cpu_us_per_msg.filter(|v| *v > 0.0)
        }),
    ];
    for (panel, (title, value_of)) in panels.into_iter().enumerate() {
        let left = PANEL_LEFT[panel];
        let x = Scale::new(&conns, left, left + PANEL_WIDTH, true);
        let values: Vec<f64> = report
            .models
            .iter()
            .flat_map(|m| m.points.iter().filter_map(value_of))
            .collect();
        let y = Scale::new(&values, PLOT_BOTTOM, PLOT_TOP, false);
        draw_axes(&mut svg, title, &x, &y, &conns);
        for model in &report.models {
            draw_series(&mut svg, model, &x, &y, value_of);
        }
    }
    draw_legend(&mut svg, &report.models);
    svg += "</svg>\n";
    svg
}

fn draw_axes(svg: &mut String, title: &str, x: &Scale, y: &Scale, conns: &[f64]) {
    let (left, right) = (x.from, x.to);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-size="13.5" font-weight="bold" text-anchor="middle">{}</text>"#,
        (left + right) / 2.0,
        PLOT_TOP - 14.0,
        escape(title)
    );
    for value in y.ticks() {
        let py = y.at(value);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{py:.1}" x2="{right}" y2="{py:.1}" stroke="#e3e3e3"/>"##
        );
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{:.1}" fill="#333333" text-anchor="end">{}</text>"##,
            left - 8.0,
            py + 4.0,
            short_number(value)
        );
    }
    for &value in conns {
        let px = x.at(value);
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{PLOT_TOP}" x2="{px:.1}" y2="{PLOT_BOTTOM}" stroke="#e3e3e3"/>"##
        );
        let _ = writeln!(
            svg,
            r##"<text x="{px:.1}" y="{}" fill="#333333" text-anchor="middle">{}</text>"##,
            PLOT_BOTTOM + 18.0,
            short_number(value)
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{left}" y="{PLOT_TOP}" width="{}" height="{}" fill="none" stroke="#999999"/>"##,
        right - left,
        PLOT_BOTTOM - PLOT_TOP
    );
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" fill="#333333" text-anchor="middle">connections{}</text>"##,
        (left + right) / 2.0,
        PLOT_BOTTOM + 38.0,
        if y.is_log {
            " (log-log)"
        } else {
            " (log scale)"
        }
    );
}

fn draw_series(svg: &mut String, model: &ModelResult, x: &Scale, y: &Scale, value_of: ValueOf) {
    let (colour, dash) = style(&model.model);
    let mut points: Vec<(&Point, f64)> = model
        .points
        .iter()
        .filter_map(|p| value_of(p).map(|v| (p, v)))
        .collect();
    points.sort_by_key(|(p, _)| p.conns);
    if points.len() >= 2 {
        let path: Vec<String> = points
            .iter()
            .map(|(p, v)| format!("{:.1},{:.1}", x.at(f64::from(p.conns)), y.at(*v)))
            .collect();
        let dash_attribute = dash_attribute(dash);
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2.2"{dash_attribute}/>"#,
            path.join(" ")
        );
    }
    for (point, value) in points {
        // Hollow: some clients got no answer at this point (the model's limit).
        let fill = if point.unanswered_conns > 0 {
            "#ffffff"
        } else {
            colour
        };
        let _ = writeln!(
            svg,
            r#"<circle cx="{:.1}" cy="{:.1}" r="4.5" fill="{fill}" stroke="{colour}" stroke-width="2"><title>{} at {} conns: {}</title></circle>"#,
            x.at(f64::from(point.conns)),
            y.at(value),
            escape(&model.model),
            point.conns,
            short_number(value)
        );
    }
}

/// The SVG attribute that draws a line dashed, or nothing for a solid one.
fn dash_attribute(dash: &str) -> String {
    if dash.is_empty() {
        String::new()
    } else {
        format!(r#" stroke-dasharray="{dash}""#)
    }
}

fn draw_legend(svg: &mut String, models: &[ModelResult]) {
    let legend_width = models.len().clamp(1, LEGEND_COLUMNS) as f64 * LEGEND_COLUMN_WIDTH;
    let start = (WIDTH - legend_width) / 2.0;
    for (index, model) in models.iter().enumerate() {
        let (colour, dash) = style(&model.model);
        let column = (index % LEGEND_COLUMNS) as f64;
        let row = (index / LEGEND_COLUMNS) as f64;
        let lx = start + column * LEGEND_COLUMN_WIDTH;
        let ly = LEGEND_TOP + row * LEGEND_ROW_HEIGHT;
        let dash_attribute = dash_attribute(dash);
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"{dash_attribute}/>"#,
            lx + 30.0
        );
        let _ = writeln!(
            svg,
            r#"<circle cx="{}" cy="{ly}" r="4.5" fill="{colour}"/>"#,
            lx + 15.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}">{}</text>"#,
            lx + 38.0,
            ly + 4.5,
            escape(&model.model)
        );
    }
    let rows = models.len().div_ceil(LEGEND_COLUMNS).max(1) as f64;
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" fill="#555555" text-anchor="middle">hollow marker: some clients got no answer at that point (the model serves fewer at a time)</text>"##,
        WIDTH / 2.0,
        LEGEND_TOP + rows * LEGEND_ROW_HEIGHT + 8.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_and_numbers() {
        let log = Scale::new(&[10.0, 50_000.0], 100.0, 0.0, false);
        assert!(log.is_log);
        assert_eq!(log.ticks(), vec![10.0, 100.0, 1000.0, 10_000.0, 100_000.0]);
        assert!((log.at(10.0) - 100.0).abs() < 1e-9);
        let linear = Scale::new(&[20_000.0, 41_000.0], 100.0, 0.0, false);
        assert!(!linear.is_log);
        assert_eq!(linear.high, 50_000.0);
        assert_eq!(short_number(1500.0), "1.5k");
        assert_eq!(short_number(20_000.0), "20k");
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(escape("a<b&"), "a&lt;b&amp;");
        assert_eq!(fit("short", 13.0), "short");
        let long = "x".repeat(500);
        assert!(fit(&long, 13.0).ends_with('…') && fit(&long, 13.0).chars().count() < 200);
    }

    #[test]
    fn every_model_has_its_own_colour_and_dash() {
        for (i, a) in STYLES.iter().enumerate() {
            for b in &STYLES[i + 1..] {
                assert_ne!(a, b, "two models drawn alike");
            }
        }
    }
}
