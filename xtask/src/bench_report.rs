//! `cargo xtask bench-report`: SVG charts from the bench results under `<target>/criterion` into
//! `docs/benchmarks/`.
//!
//! Criterion keeps one `new/benchmark.json` (its ids) and `new/estimates.json` (its estimates, in
//! nanoseconds) per bench; figures measured outside criterion (bytes on the wire, one-off
//! timings) are kept beside them in `criterion/propd/*.json` by `propd_benches::results`. Each
//! chart that has no data is not drawn, and the report names the bench that produces it. The
//! charts are drawn by hand: four simple charts need no plotting library and its dependencies.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde_json::Value;

/// One series of a line chart: its name and its `(x, y)` points.
type Series = (String, Vec<(f64, f64)>);

pub(crate) fn run(root: &Path) -> Result<()> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let criterion = target.join("criterion");
    let out = root.join("docs").join("benchmarks");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let estimates = read_criterion(&criterion)?;
    let mut missing = Vec::new();
    let mut written = Vec::new();
    let mut emit = |name: &str, svg: Option<String>, bench: &str| -> Result<()> {
        match svg {
            Some(svg) => {
                let path = out.join(name);
                std::fs::write(&path, svg)
                    .with_context(|| format!("writing {}", path.display()))?;
                written.push(path);
            }
            None => missing.push(format!("{name}: no results; run `{bench}`")),
        }
        Ok(())
    };
    emit(
        "bandwidth.svg",
        bandwidth(&criterion),
        "cargo bench -p propd-benches --bench repair -- bandwidth",
    )?;
    emit(
        "bootstrap.svg",
        bootstrap(&criterion),
        "PROPD_BENCH_REPAIR_THROUGHPUT_N=<n> cargo bench -p propd-benches --bench repair -- throughput (once per n)",
    )?;
    emit(
        "writes.svg",
        writes(&estimates),
        "cargo bench -p propd-benches --bench store -- store_write",
    )?;
    emit(
        "query.svg",
        query(&estimates),
        "cargo bench -p propd-benches --bench query",
    )?;
    for path in &written {
        println!("wrote {}", path.display());
    }
    for line in &missing {
        println!("missing {line}");
    }
    Ok(())
}

/// Criterion's mean time per iteration (ns), by `group/function`.
fn read_criterion(dir: &Path) -> Result<BTreeMap<String, f64>> {
    let mut found = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            let (benchmark, estimates) = (path.join("benchmark.json"), path.join("estimates.json"));
            if path.ends_with("new") && benchmark.exists() && estimates.exists() {
                let benchmark = read_json(&benchmark)?;
                let estimates = read_json(&estimates)?;
                let id = match (
                    benchmark["group_id"].as_str(),
                    benchmark["function_id"].as_str(),
                ) {
                    (Some(group), Some(function)) => format!("{group}/{function}"),
                    _ => continue,
                };
                if let Some(mean) = estimates["mean"]["point_estimate"].as_f64() {
                    found.insert(id, mean);
                }
            } else {
                stack.push(path);
            }
        }
    }
    Ok(found)
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Tree bytes per difference against d, one series per shape.
fn bandwidth(criterion: &Path) -> Option<String> {
    let rows = read_json(&criterion.join("propd").join("repair_bandwidth.json")).ok()?;
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut n = 0.0;
    for row in rows.as_array()? {
        let (shape, d, tree) = (
            row["shape"].as_str()?,
            row["d"].as_f64()?,
            row["tree"].as_f64()?,
        );
        n = row["n"].as_f64().unwrap_or(n);
        series
            .entry(format!("{shape} shape"))
            .or_default()
            .push((d, tree / d));
    }
    if series.is_empty() {
        return None;
    }
    Some(line_chart(&LineChart {
        title: &format!("Repair: tree bytes per difference (n = {n})"),
        x_label: "differences d",
        y_label: "tree bytes / difference",
        log_x: true,
        log_y: true,
        series: series.into_iter().collect(),
    }))
}

/// Time to fill an empty replica against n: the sync and the local bulk load.
fn bootstrap(criterion: &Path) -> Option<String> {
    let entries = std::fs::read_dir(criterion.join("propd")).ok()?;
    let (mut sync, mut local) = (Vec::new(), Vec::new());
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("bootstrap_n") {
            continue;
        }
        let Ok(row) = read_json(&entry.path()) else {
            continue;
        };
        if let (Some(n), Some(l), Some(s)) = (
            row["n"].as_f64(),
            row["local_bulk_load_s"].as_f64(),
            row["sync_s"].as_f64(),
        ) {
            local.push((n, l));
            sync.push((n, s));
        }
    }
    if sync.is_empty() {
        return None;
    }
    sync.sort_by(|a, b| a.0.total_cmp(&b.0));
    local.sort_by(|a, b| a.0.total_cmp(&b.0));
    Some(line_chart(&LineChart {
        title: "Bootstrap: an empty replica filled (properties of ~2 KB)",
        x_label: "properties n",
        y_label: "seconds",
        log_x: sync.len() > 2,
        log_y: false,
        series: vec![
            ("sync over loopback".to_owned(), sync),
            ("local bulk load, key order".to_owned(), local),
        ],
    }))
}

/// Writes per second with and without the live tree.
fn writes(estimates: &BTreeMap<String, f64>) -> Option<String> {
    let mut bars = Vec::new();
    for (scenario, per_iteration, label) in [
        ("apply_synced", 1.0, "single synced writes"),
        ("batch1000_synced", 1000.0, "batches of 1000"),
    ] {
        for (upkeep, with) in [("live_tree", "with tree"), ("no_tree", "without tree")] {
            let ns = estimates.get(&format!("store_write/{scenario}/{upkeep}"))?;
            bars.push((format!("{label}, {with}"), per_iteration / (ns / 1e9)));
        }
    }
    Some(bar_chart(
        "Store writes per second (synced)",
        "writes / s",
        &bars,
    ))
}

/// Properties per second of a whole-group query, paged and unpaged.
fn query(estimates: &BTreeMap<String, f64>) -> Option<String> {
    let mut bars = Vec::new();
    for (id, ns) in estimates.range("query_group/".to_owned()..) {
        let Some(rest) = id.strip_prefix("query_group/") else {
            break;
        };
        let (n, variant) = rest.split_once('/')?;
        let n: f64 = n.parse().ok()?;
        bars.push((format!("{variant} (n = {n})"), n / (ns / 1e9)));
    }
    (!bars.is_empty()).then(|| bar_chart("Query of a whole group", "properties / s", &bars))
}

struct LineChart<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    log_x: bool,
    log_y: bool,
    series: Vec<Series>,
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A number as a tick label: 1 200 000 as 1.2M.
fn short(value: f64) -> String {
    let abs = value.abs();
    let (scaled, suffix) = if abs >= 1e9 {
        (value / 1e9, "G")
    } else if abs >= 1e6 {
        (value / 1e6, "M")
    } else if abs >= 1e3 {
        (value / 1e3, "k")
    } else {
        (value, "")
    };
    let text = if scaled.fract().abs() < 1e-9 || scaled.abs() >= 10.0 {
        format!("{scaled:.0}")
    } else {
        format!("{scaled:.1}")
    };
    format!("{text}{suffix}")
}

/// An axis: maps values to pixels, on a linear or decimal-log scale, with its ticks.
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64>, log: bool) -> Self {
        let values: Vec<f64> = values
            .filter(|v| v.is_finite() && (!log || *v > 0.0))
            .collect();
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if log {
            let lo = 10f64.powf(min.log10().floor());
            let hi = 10f64.powf(max.log10().ceil().max(min.log10().floor() + 1.0));
            Axis { lo, hi, log }
        } else {
            let hi = if max > 0.0 { max * 1.1 } else { 1.0 };
            Axis { lo: 0.0, hi, log }
        }
    }

    /// The position of `value` between 0 and 1.
    fn unit(&self, value: f64) -> f64 {
        if self.log {
            (value.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (value - self.lo) / (self.hi - self.lo)
        }
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let mut ticks = Vec::new();
            let mut tick = self.lo;
            while tick <= self.hi * 1.0001 {
                ticks.push(tick);
                tick *= 10.0;
            }
            ticks
        } else {
            let step = nice_step(self.hi / 5.0);
            (0..=((self.hi / step) as usize))
                .map(|i| i as f64 * step)
                .collect()
        }
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|step| *step >= raw)
        .unwrap_or(10.0 * power)
}

fn frame(svg: &mut String, title: &str) {
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{x}" y="28" text-anchor="middle" font-size="15">{title}</text>
"#,
        x = WIDTH / 2.0,
        title = escape(title)
    );
}

fn line_chart(chart: &LineChart<'_>) -> String {
    let points = || chart.series.iter().flat_map(|(_, points)| points.iter());
    let x_axis = Axis::new(points().map(|p| p.0), chart.log_x);
    let y_axis = Axis::new(points().map(|p| p.1), chart.log_y);
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let px = |x: f64| LEFT + x_axis.unit(x) * plot_w;
    let py = |y: f64| TOP + plot_h - y_axis.unit(y) * plot_h;
    let mut svg = String::new();
    frame(&mut svg, chart.title);
    for tick in y_axis.ticks() {
        let y = py(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{x2:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{tx:.1}" y="{ty:.1}" text-anchor="end">{label}</text>"##,
            x2 = LEFT + plot_w,
            tx = LEFT - 6.0,
            ty = y + 4.0,
            label = short(tick)
        );
    }
    for tick in x_axis.ticks() {
        let x = px(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{y2:.1}" stroke="#eee"/><text x="{x:.1}" y="{ty:.1}" text-anchor="middle">{label}</text>"##,
            y2 = TOP + plot_h,
            ty = TOP + plot_h + 18.0,
            label = short(tick)
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>
<text x="{xl:.1}" y="{xly:.1}" text-anchor="middle">{x_label}</text>
<text transform="translate(22 {yly:.1}) rotate(-90)" text-anchor="middle">{y_label}</text>"##,
        xl = LEFT + plot_w / 2.0,
        xly = HEIGHT - 18.0,
        yly = TOP + plot_h / 2.0,
        x_label = escape(chart.x_label),
        y_label = escape(chart.y_label),
    );
    for (i, (name, points)) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for &(x, y) in points {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"><title>{}: {}</title></circle>"#,
                px(x),
                py(y),
                short(x),
                short(y)
            );
        }
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let lx = LEFT + plot_w + 14.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" y1="{ly}" x2="{x2}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{tx}" y="{ty}">{name}</text>"#,
            x2 = lx + 20.0,
            tx = lx + 26.0,
            ty = ly + 4.0,
            name = escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn bar_chart(title: &str, y_label: &str, bars: &[(String, f64)]) -> String {
    let axis = Axis::new(bars.iter().map(|b| b.1), false);
    let (plot_w, plot_h) = (WIDTH - LEFT - 30.0, HEIGHT - TOP - BOTTOM - 40.0);
    let py = |y: f64| TOP + plot_h - axis.unit(y) * plot_h;
    let mut svg = String::new();
    frame(&mut svg, title);
    for tick in axis.ticks() {
        let y = py(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{x2:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{tx:.1}" y="{ty:.1}" text-anchor="end">{label}</text>"##,
            x2 = LEFT + plot_w,
            tx = LEFT - 6.0,
            ty = y + 4.0,
            label = short(tick)
        );
    }
    let slot = plot_w / bars.len().max(1) as f64;
    for (i, (label, value)) in bars.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let x = LEFT + i as f64 * slot + slot * 0.15;
        let y = py(*value);
        let _ = writeln!(
            svg,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{color}"/><text x="{cx:.1}" y="{vy:.1}" text-anchor="middle">{v}</text><text x="{cx:.1}" y="{ly:.1}" text-anchor="middle" font-size="11">{label}</text>"#,
            w = slot * 0.7,
            h = TOP + plot_h - y,
            cx = x + slot * 0.35,
            vy = y - 5.0,
            v = short(*value),
            ly = TOP + plot_h + 18.0 + (i % 2) as f64 * 14.0,
            label = escape(label)
        );
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" y1="{y:.1}" x2="{x2:.1}" y2="{y:.1}" stroke="#444"/>
<text transform="translate(22 {yly:.1}) rotate(-90)" text-anchor="middle">{y_label}</text>"##,
        y = TOP + plot_h,
        x2 = LEFT + plot_w,
        yly = TOP + plot_h / 2.0,
        y_label = escape(y_label)
    );
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg_with_every_series() {
        let svg = line_chart(&LineChart {
            title: "t <1>",
            x_label: "x",
            y_label: "y",
            log_x: true,
            log_y: true,
            series: vec![
                (
                    "a".into(),
                    vec![(1.0, 900.0), (10.0, 500.0), (1000.0, 280.0)],
                ),
                ("b".into(), vec![(1.0, 250_000.0), (1000.0, 8000.0)]),
            ],
        });
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("t &lt;1&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 5);
        let bars = bar_chart("w", "per s", &[("x".into(), 10.0), ("y".into(), 20.0)]);
        assert_eq!(bars.matches("<rect x=").count(), 2);
    }

    #[test]
    fn ticks_and_labels_are_round() {
        assert_eq!(short(1_200_000.0), "1.2M");
        assert_eq!(short(45_000.0), "45k");
        assert_eq!(short(7.0), "7");
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(1800.0), 2000.0);
        let axis = Axis::new([3.0, 250_000.0].into_iter(), true);
        assert_eq!(axis.ticks(), vec![1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6]);
    }

    #[test]
    fn criterion_estimates_are_read_by_group_and_function() {
        let dir = tempdir();
        let bench = dir
            .join("store_write")
            .join("apply_synced_live_tree")
            .join("new");
        std::fs::create_dir_all(&bench).unwrap();
        std::fs::write(
            bench.join("benchmark.json"),
            r#"{"group_id":"store_write","function_id":"apply_synced/live_tree"}"#,
        )
        .unwrap();
        std::fs::write(
            bench.join("estimates.json"),
            r#"{"mean":{"point_estimate":2000000.0}}"#,
        )
        .unwrap();
        let found = read_criterion(&dir).unwrap();
        assert_eq!(found.get("store_write/apply_synced/live_tree"), Some(&2e6));
        assert!(
            writes(&found).is_none(),
            "a missing series leaves the chart out"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
