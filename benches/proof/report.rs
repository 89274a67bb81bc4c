//! Results: the data model (also the JSON), the terminal table, gnuplot PNGs, and the generated
//! section of docs/BENCHMARKS.md (between `<!-- proof:begin -->` and `<!-- proof:end -->`; the
//! prose around it is kept).

use crate::sut::MosqSettings;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One system measured in one case of one scenario.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResult {
    pub scenario: String,
    pub case: String,
    pub system: String,
    pub payload: usize,
    /// Offered rate, msg/s; `None` = max rate.
    pub rate: Option<f64>,
    pub clients: usize,
    pub window: usize,
    /// Published by the device clients / acknowledged by the system / seen upstream (unique).
    pub sent: u64,
    pub acked: u64,
    pub received: u64,
    /// Acked by the system but never seen upstream.
    pub lost: u64,
    pub duplicates: u64,
    /// Arrivals whose per-device sequence number went backwards.
    pub reordered: u64,
    /// Seconds from the first publish to the last arrival upstream.
    pub duration_s: f64,
    /// Unique arrivals per second over `duration_s`.
    pub throughput: f64,
    pub lat_p50_ms: Option<f64>,
    pub lat_p99_ms: Option<f64>,
    pub lat_max_ms: Option<f64>,
    /// CPU seconds (user + system, all threads) of the system under test during the run.
    pub cpu_s: f64,
    pub cpu_us_per_msg: Option<f64>,
    pub rss_kib: u64,
    pub rss_peak_kib: u64,
    pub hwm_kib: u64,
    /// `/proc/PID/io` write_bytes during the run (before the stop).
    pub write_bytes: u64,
    /// write_bytes per payload byte acknowledged.
    pub write_amp: Option<f64>,
    /// Scenario-specific figures (names are self-describing, units in the suffix).
    pub metrics: BTreeMap<String, f64>,
    /// (seconds since the upstream came back, cumulative unique arrivals), backlog drains only.
    pub series: Vec<(f64, u64)>,
    pub notes: Vec<String>,
    pub error: Option<String>,
}

impl RunResult {
    pub fn m(&mut self, k: &str, v: f64) {
        self.metrics.insert(k.to_string(), v);
    }
    pub fn get(&self, k: &str) -> Option<f64> {
        self.metrics.get(k).copied()
    }
    pub fn note(&mut self, n: String) {
        self.notes.push(n);
    }
    pub fn done(mut self, res: Result<()>) -> RunResult {
        if let Err(e) = res {
            self.error = Some(format!("{e:#}"));
        }
        if self.lost > 0 {
            self.note(format!(
                "{} acked messages never arrived upstream",
                self.lost
            ));
        }
        self
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Suite {
    pub command: String,
    pub date_utc: String,
    pub machine: BTreeMap<String, String>,
    pub versions: BTreeMap<String, String>,
    pub settings: BTreeMap<String, String>,
    pub mosquitto: Option<MosqSettings>,
    pub binary_sizes: BTreeMap<String, u64>,
    pub runs: Vec<RunResult>,
    pub total_s: f64,
}

/// Runs a short command with a bounded wait; its first output line, or "" on failure.
fn cmd_line(prog: &str, args: &[&str]) -> String {
    let Ok(mut child) = Command::new(prog)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
    else {
        return String::new();
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            let out = child.wait_with_output().map(|o| {
                let mut s = String::from_utf8_lossy(&o.stdout).to_string();
                s.push_str(&String::from_utf8_lossy(&o.stderr));
                s
            });
            return out
                .unwrap_or_default()
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    String::new()
}

/// Size of a binary alone and with every shared library `ldd` lists.
fn sizes(path: &Path) -> (u64, u64) {
    let own = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let out = Command::new("ldd")
        .arg(path)
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    let libs: u64 = String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split("=>").nth(1).or(Some(l)))
        .filter_map(|rhs| rhs.split_whitespace().find(|w| w.starts_with('/')))
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    (own, own + libs)
}

impl Suite {
    pub fn describe(
        command: &str,
        binary: &Path,
        mosq: &MosqSettings,
        settings: &BTreeMap<String, String>,
    ) -> Suite {
        let mut machine = BTreeMap::new();
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name") || l.starts_with("Hardware"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("?")
            .trim()
            .to_string();
        machine.insert("cpu".into(), model);
        machine.insert(
            "nproc".into(),
            std::thread::available_parallelism()
                .map(|n| n.get().to_string())
                .unwrap_or_default(),
        );
        machine.insert(
            "kernel".into(),
            fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .into(),
        );
        let mem = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        if let Some(l) = mem.lines().find(|l| l.starts_with("MemTotal")) {
            machine.insert(
                "memory".into(),
                l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "),
            );
        }
        let os = fs::read_to_string("/etc/os-release").unwrap_or_default();
        if let Some(l) = os.lines().find(|l| l.starts_with("PRETTY_NAME=")) {
            machine.insert("os".into(), l[12..].trim_matches('"').into());
        }
        let mut versions = BTreeMap::new();
        versions.insert("mosquitto".into(), cmd_line("mosquitto", &["-h"]));
        versions.insert(
            "edgeferry".into(),
            cmd_line(&binary.to_string_lossy(), &["--version"]),
        );
        versions.insert("rustc".into(), cmd_line("rustc", &["--version"]));
        versions.insert("edgeferry_commit".into(), {
            // The checkout this bench was built from, marked when it had uncommitted changes.
            let dir = env!("CARGO_MANIFEST_DIR");
            let head = cmd_line("git", &["-C", dir, "log", "-1", "--format=%h %s"]);
            let dirty = std::process::Command::new("git")
                .args(["-C", dir, "status", "--porcelain", "--untracked-files=no"])
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false);
            if dirty {
                format!("{head} (with uncommitted changes)")
            } else {
                head
            }
        });
        let mut binary_sizes = BTreeMap::new();
        let (e, el) = sizes(binary);
        binary_sizes.insert("edgeferry".into(), e);
        binary_sizes.insert("edgeferry_with_libs".into(), el);
        let (m, ml) = sizes(Path::new("/usr/sbin/mosquitto"));
        binary_sizes.insert("mosquitto".into(), m);
        binary_sizes.insert("mosquitto_with_libs".into(), ml);
        let date = cmd_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
        Suite {
            command: command.into(),
            date_utc: date,
            machine,
            versions,
            settings: settings.clone(),
            mosquitto: Some(mosq.clone()),
            binary_sizes,
            runs: Vec::new(),
            total_s: 0.0,
        }
    }
}

pub fn size_label(b: usize) -> String {
    if b >= 1024 && b % 1024 == 0 {
        format!("{} KiB", b / 1024)
    } else {
        format!("{b} B")
    }
}

pub fn count_label(n: u64) -> String {
    if n >= 1_000_000 && n % 1_000_000 == 0 {
        format!("{}M", n / 1_000_000)
    } else if n >= 1000 && n % 1000 == 0 {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

fn f(v: Option<f64>, prec: usize) -> String {
    v.map(|v| format!("{v:.prec$}"))
        .unwrap_or_else(|| "–".into())
}

fn mib(kib: f64) -> String {
    if kib <= 0.0 {
        "–".into()
    } else {
        format!("{:.1}", kib / 1024.0)
    }
}

pub fn one_line(r: &RunResult) -> String {
    if let Some(e) = &r.error {
        return format!(
            "{} {} {}: FAILED: {}",
            r.scenario,
            r.case,
            r.system,
            e.lines().next().unwrap_or("")
        );
    }
    format!(
        "{} {} {}: {:.0} msg/s, p50 {} ms, p99 {} ms, lost {}, dup {}, cpu {} us/msg",
        r.scenario,
        r.case,
        r.system,
        r.throughput,
        f(r.lat_p50_ms, 2),
        f(r.lat_p99_ms, 2),
        r.lost,
        r.duplicates,
        f(r.cpu_us_per_msg, 1)
    )
}

pub fn print_table(s: &Suite) {
    println!(
        "\n{:<10} {:<16} {:<10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>5} {:>8} {:>8} {:>8}",
        "scenario",
        "case",
        "system",
        "acked",
        "msg/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "lost",
        "dup",
        "cpu us/m",
        "rss MiB",
        "wr amp"
    );
    for r in &s.runs {
        if let Some(e) = &r.error {
            println!(
                "{:<10} {:<16} {:<10} FAILED: {}",
                r.scenario,
                r.case,
                r.system,
                e.lines().next().unwrap_or("")
            );
            continue;
        }
        println!(
            "{:<10} {:<16} {:<10} {:>9} {:>9.0} {:>9} {:>9} {:>9} {:>6} {:>5} {:>8} {:>8} {:>8}",
            r.scenario,
            r.case,
            r.system,
            r.acked,
            r.throughput,
            f(r.lat_p50_ms, 2),
            f(r.lat_p99_ms, 2),
            f(r.lat_max_ms, 1),
            r.lost,
            r.duplicates,
            f(r.cpu_us_per_msg, 1),
            mib(r.rss_peak_kib.max(r.rss_kib) as f64),
            f(r.write_amp, 2)
        );
    }
}

// ------------------------------------------------------------------------------------------
// Plots

const SYSTEMS: [&str; 2] = ["edgeferry", "mosquitto"];

fn find<'a>(s: &'a Suite, scenario: &str, case: &str, system: &str) -> Option<&'a RunResult> {
    s.runs.iter().find(|r| {
        r.scenario == scenario && r.case == case && r.system == system && r.error.is_none()
    })
}

fn cases(s: &Suite, scenario: &str) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for r in s.runs.iter().filter(|r| r.scenario == scenario) {
        if !v.contains(&r.case) {
            v.push(r.case.clone());
        }
    }
    v
}

/// Indices into [`SYSTEMS`] with at least one successful run in `scenario` (gnuplot refuses a
/// histogram column with no valid points).
fn present_systems(s: &Suite, scenario: &str) -> Vec<usize> {
    (0..SYSTEMS.len())
        .filter(|&i| {
            s.runs
                .iter()
                .any(|r| r.scenario == scenario && r.system == SYSTEMS[i] && r.error.is_none())
        })
        .collect()
}

/// A data file with one row per case: `"case" <value per system per column>`; missing = NaN.
#[allow(clippy::type_complexity)]
fn table_dat(s: &Suite, scenario: &str, cols: &[&dyn Fn(&RunResult) -> Option<f64>]) -> String {
    let mut out = String::new();
    for c in cases(s, scenario) {
        let _ = write!(out, "\"{c}\"");
        for col in cols {
            for sys in SYSTEMS {
                let v = find(s, scenario, &c, sys).and_then(col);
                let _ = write!(
                    out,
                    " {}",
                    v.map(|v| format!("{v}")).unwrap_or_else(|| "NaN".into())
                );
            }
        }
        out.push('\n');
    }
    out
}

fn gnuplot(script: &str, dir: &Path) -> Result<()> {
    let gp = dir.join("plot.gp");
    fs::write(&gp, script)?;
    let mut child = Command::new("gnuplot")
        .arg(&gp)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running gnuplot (apt-get install gnuplot-nox)")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            if !st.success() {
                anyhow::bail!("gnuplot failed: {err}");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("gnuplot took over 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const GP_HEAD: &str = "set terminal pngcairo size 1400,450 font 'DejaVu Sans,10'\n\
set style data histograms\nset style histogram clustered gap 1\nset style fill solid 0.85 border -1\n\
set boxwidth 0.9\nset grid ytics\nset key top left\nset xtics noenhance\nset yrange [0:*]\n";

fn plot_all(s: &Suite, dir: &Path) -> Result<Vec<(String, String)>> {
    fs::create_dir_all(dir)?;
    let mut made = Vec::new();
    let work = tempfile::tempdir()?;
    let w = work.path();

    if !cases(s, "online").is_empty() {
        let present = present_systems(s, "online");
        fs::write(
            w.join("online.dat"),
            table_dat(
                s,
                "online",
                &[
                    &|r| Some(r.throughput),
                    &|r| r.lat_p50_ms,
                    &|r| r.lat_p99_ms,
                    &|r| r.cpu_us_per_msg,
                ],
            ),
        )?;
        let script = format!(
            "{GP_HEAD}set output '{out}'\nset multiplot layout 1,3\n{a}{b}{c}unset multiplot\n",
            out = dir.join("online.png").display(),
            a = bars_cols(
                "online.dat",
                &present,
                &[(2, "")],
                "msg/s",
                "Throughput (unique msgs upstream)",
                false
            ),
            b = bars_cols(
                "online.dat",
                &present,
                &[(4, "p50"), (6, "p99")],
                "ms (log)",
                "End-to-end latency",
                true
            ),
            c = bars_cols(
                "online.dat",
                &present,
                &[(8, "")],
                "CPU µs per message",
                "CPU time per message",
                false
            ),
        );
        if let Err(e) = gnuplot(&script, w) {
            eprintln!("proof: plot skipped: {e:#}");
        } else {
            made.push(("online".into(), "online.png".into()));
        }
    }

    for (sc, file) in [
        ("outage", "outage.png"),
        ("footprint", "footprint_drain.png"),
    ] {
        let runs: Vec<&RunResult> = s
            .runs
            .iter()
            .filter(|r| r.scenario == sc && r.error.is_none() && !r.series.is_empty())
            .collect();
        if runs.is_empty() {
            continue;
        }
        let mut plots = Vec::new();
        for r in &runs {
            let name = format!("{sc}-{}-{}.dat", r.system, r.case.len());
            let body: String = r
                .series
                .iter()
                .map(|(t, n)| format!("{t:.2} {n}\n"))
                .collect();
            fs::write(w.join(&name), body)?;
            let label = if r.case.contains("restart") {
                format!("{} (restarted during outage)", r.system)
            } else {
                r.system.clone()
            };
            let color = if r.system == "edgeferry" {
                "#1f77b4"
            } else {
                "#ff7f0e"
            };
            let dash = if r.case.contains("restart") { 2 } else { 1 };
            plots.push(format!(
                "'{name}' using 1:2 with lines lw 2 dt {dash} lc rgb '{color}' title '{label}'"
            ));
        }
        let script = format!(
            "set terminal pngcairo size 1000,450 font 'DejaVu Sans,10'\nset output '{out}'\n\
             set title 'Backlog drain after the upstream returns ({case})'\nset grid\nset key top left\n\
             set xlabel 's since upstream restart'\nset ylabel 'messages delivered upstream'\n\
             set format y '%.0s%c'\nplot {p}\n",
            out = dir.join(file).display(),
            case = runs[0].case,
            p = plots.join(", ")
        );
        if let Err(e) = gnuplot(&script, w) {
            eprintln!("proof: plot skipped: {e:#}");
        } else {
            made.push((sc.into(), file.into()));
        }
    }

    if !cases(s, "footprint").is_empty() {
        let present = present_systems(s, "footprint");
        fs::write(
            w.join("fp.dat"),
            table_dat(
                s,
                "footprint",
                &[
                    &|r| r.get("idle_rss_kib").map(|v| v / 1024.0),
                    &|r| r.get("load_rss_peak_kib").map(|v| v / 1024.0),
                    &|r| r.get("backlog_rss_kib").map(|v| v / 1024.0),
                ],
            ),
        )?;
        let script = format!(
            "{GP_HEAD}set output '{out}'\nset multiplot layout 1,3\n{a}{b}{c}unset multiplot\n",
            out = dir.join("footprint.png").display(),
            a = bars_cols("fp.dat", &present, &[(2, "")], "MiB", "RSS idle", false),
            b = bars_cols(
                "fp.dat",
                &present,
                &[(4, "")],
                "MiB",
                "RSS peak under max-rate load",
                false
            ),
            c = bars_cols(
                "fp.dat",
                &present,
                &[(6, "")],
                "MiB",
                "RSS holding the backlog",
                false
            ),
        );
        if let Err(e) = gnuplot(&script, w) {
            eprintln!("proof: plot skipped: {e:#}");
        } else {
            made.push(("footprint".into(), "footprint.png".into()));
        }
    }

    if !cases(s, "write").is_empty() {
        let present = present_systems(s, "write");
        fs::write(
            w.join("wr.dat"),
            table_dat(s, "write", &[&|r| r.write_amp, &|r| r.cpu_us_per_msg]),
        )?;
        let script = format!(
            "{GP_HEAD}set output '{out}'\nset multiplot layout 1,2\n{a}{b}unset multiplot\n",
            out = dir.join("write.png").display(),
            a = bars_cols(
                "wr.dat",
                &present,
                &[(2, "")],
                "bytes written / payload byte",
                "Write amplification",
                false
            ),
            b = bars_cols(
                "wr.dat",
                &present,
                &[(4, "")],
                "CPU µs per message",
                "CPU time per message",
                false
            ),
        );
        if let Err(e) = gnuplot(&script, w) {
            eprintln!("proof: plot skipped: {e:#}");
        } else {
            made.push(("write".into(), "write.png".into()));
        }
    }

    if !cases(s, "idle").is_empty() {
        let present = present_systems(s, "idle");
        fs::write(
            w.join("idle.dat"),
            table_dat(
                s,
                "idle",
                &[&|r| r.get("ctxsw_per_s"), &|r| r.get("cpu_ms_per_s")],
            ),
        )?;
        let script = format!(
            "{GP_HEAD}set output '{out}'\nset multiplot layout 1,2\n{a}{b}unset multiplot\n",
            out = dir.join("idle.png").display(),
            a = bars_cols(
                "idle.dat",
                &present,
                &[(2, "")],
                "switches/s",
                "Context switches per second, idle",
                false
            ),
            b = bars_cols(
                "idle.dat",
                &present,
                &[(4, "")],
                "CPU ms per s",
                "CPU while idle",
                false
            ),
        );
        if let Err(e) = gnuplot(&script, w) {
            eprintln!("proof: plot skipped: {e:#}");
        } else {
            made.push(("idle".into(), "idle.png".into()));
        }
    }
    Ok(made)
}

/// A clustered-bar panel: one cluster per case; per group `(c, label)` one bar per system
/// (edgeferry from column `c`, mosquitto from `c + 1`, as [`table_dat`] lays them out).
fn bars_cols(
    dat: &str,
    present: &[usize],
    groups: &[(usize, &str)],
    ylabel: &str,
    title: &str,
    log: bool,
) -> String {
    let mut s = format!("set title '{title}'\nset ylabel '{ylabel}'\n");
    if log {
        s.push_str("set logscale y\nset yrange [*:*]\n");
    } else {
        s.push_str("unset logscale y\nset yrange [0:*]\n");
    }
    let colors = ["#1f77b4", "#ff7f0e", "#6baed6", "#fdae6b"];
    let mut parts = Vec::new();
    for (gi, (c, t)) in groups.iter().enumerate() {
        for (si, sys) in SYSTEMS.iter().enumerate() {
            if !present.contains(&si) {
                continue;
            }
            let label = if t.is_empty() {
                sys.to_string()
            } else {
                format!("{sys} {t}")
            };
            let xt = if parts.is_empty() { ":xtic(1)" } else { "" };
            parts.push(format!(
                "'{dat}' using {}{xt} title '{label}' lc rgb '{}'",
                c + si,
                colors[(gi * 2 + si) % colors.len()]
            ));
        }
    }
    s.push_str(&format!("plot {}\n", parts.join(", \\\n  ")));
    s
}

// ------------------------------------------------------------------------------------------
// Markdown

const BEGIN: &str = "<!-- proof:begin -->";
const END: &str = "<!-- proof:end -->";

fn row(cells: &[String]) -> String {
    format!("| {} |\n", cells.join(" | "))
}

fn header(cells: &[&str]) -> String {
    let mut s = row(&cells.iter().map(|c| c.to_string()).collect::<Vec<_>>());
    s.push_str(&row(&cells
        .iter()
        .map(|_| "---".to_string())
        .collect::<Vec<_>>()));
    s
}

fn failed_row(r: &RunResult, width: usize) -> String {
    let mut cells = vec![r.case.clone(), format!("**{}**", r.system)];
    let e = r
        .error
        .as_deref()
        .unwrap_or("")
        .lines()
        .next()
        .unwrap_or("")
        .replace('|', "\\|");
    cells.push(format!("failed: {e}"));
    while cells.len() < width {
        cells.push(String::new());
    }
    row(&cells)
}

fn int(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

pub fn section(s: &Suite, plots: &[(String, String)]) -> String {
    let mut md = String::new();
    let img = |md: &mut String, sc: &str| {
        for (name, file) in plots.iter().filter(|(n, _)| n == sc) {
            let _ = writeln!(md, "\n![{name}](bench/{file})");
        }
    };
    let _ = writeln!(md, "{BEGIN}\n<!-- Generated by `cargo bench --bench proof`; edit the prose outside these markers. -->\n");
    let _ = writeln!(md, "## Run\n\n```sh\n{}\n```\n", s.command);
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| date | {} |", s.date_utc);
    for (k, v) in &s.machine {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    for (k, v) in &s.versions {
        let _ = writeln!(md, "| {k} | `{}` |", if v.is_empty() { "?" } else { v });
    }
    if let Some(m) = &s.mosquitto {
        let _ = writeln!(
            md,
            "| mosquitto bridge | `persistence true`, `autosave_interval {}`, `max_queued_messages {}`, `cleansession false`, `topic bench/# out 1`, other settings default |",
            m.autosave_interval, m.max_queued_messages
        );
    }
    for (k, v) in &s.settings {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let _ = writeln!(md, "| wall time | {:.0} s |\n", s.total_s);

    // 1. online
    if !cases(s, "online").is_empty() {
        let _ = writeln!(md, "## 1. Online: upstream connected\n");
        md.push_str(&header(&[
            "case",
            "system",
            "acked",
            "msg/s upstream",
            "p50 ms",
            "p99 ms",
            "max ms",
            "lost",
            "dup",
            "CPU µs/msg",
            "peak RSS MiB",
        ]));
        for r in s.runs.iter().filter(|r| r.scenario == "online") {
            if r.error.is_some() {
                md.push_str(&failed_row(r, 11));
                continue;
            }
            md.push_str(&row(&[
                r.case.clone(),
                format!("**{}**", r.system),
                int(r.acked),
                format!("{:.0}", r.throughput),
                f(r.lat_p50_ms, 2),
                f(r.lat_p99_ms, 2),
                f(r.lat_max_ms, 1),
                int(r.lost),
                int(r.duplicates),
                f(r.cpu_us_per_msg, 1),
                mib(r.rss_peak_kib as f64),
            ]));
        }
        img(&mut md, "online");
        md.push('\n');
    }

    // 2. outage
    let drain_table = |md: &mut String, sc: &str| {
        md.push_str(&header(&[
            "case",
            "system",
            "acked offline",
            "ingest msg/s (offline)",
            "first msg after restart s",
            "drain s",
            "drain msg/s",
            "lost",
            "dup",
            "reordered",
            "CPU µs/msg",
            "store at backlog MiB",
            "store after SIGTERM with backlog MiB",
            "stop s",
        ]));
        for r in s.runs.iter().filter(|r| r.scenario == sc) {
            if r.error.is_some() {
                md.push_str(&failed_row(r, 14));
                continue;
            }
            md.push_str(&row(&[
                r.case.clone(),
                format!("**{}**", r.system),
                int(r.acked),
                f(r.get("ingest_msg_per_s"), 0),
                f(r.get("time_to_first_s"), 2),
                f(r.get("drain_s"), 2),
                f(r.get("drain_msg_per_s"), 0),
                int(r.lost),
                int(r.duplicates),
                int(r.reordered),
                f(r.cpu_us_per_msg, 1),
                r.get("backlog_store_bytes")
                    .map(|b| format!("{:.1}", b / 1048576.0))
                    .unwrap_or("–".into()),
                r.get("restart_store_bytes")
                    .map(|b| format!("{:.1}", b / 1048576.0))
                    .unwrap_or("–".into()),
                f(r.get("stop_s"), 2),
            ]));
        }
    };
    if !cases(s, "outage").is_empty() {
        let _ = writeln!(
            md,
            "## 2. Outage backlog: upstream down, publish, upstream back\n"
        );
        drain_table(&mut md, "outage");
        img(&mut md, "outage");
        md.push('\n');
    }

    // 3. footprint
    if !cases(s, "footprint").is_empty() {
        let _ = writeln!(md, "## 3. Footprint\n");
        let bs = &s.binary_sizes;
        let sz = |k: &str| {
            bs.get(k)
                .map(|b| format!("{:.2} MiB", *b as f64 / 1048576.0))
                .unwrap_or("–".into())
        };
        let _ = writeln!(md, "Binary: edgeferry {} ({} with the shared libraries `ldd` lists); mosquitto {} ({} with its libraries).\n",
            sz("edgeferry"), sz("edgeferry_with_libs"), sz("mosquitto"), sz("mosquitto_with_libs"));
        md.push_str(&header(&[
            "case",
            "system",
            "threads",
            "RSS idle MiB",
            "RSS peak, max-rate load MiB",
            "load msg/s",
            "RSS with backlog MiB",
            "VmHWM MiB",
            "store with backlog MiB",
        ]));
        for r in s.runs.iter().filter(|r| r.scenario == "footprint") {
            if r.error.is_some() {
                md.push_str(&failed_row(r, 9));
                continue;
            }
            md.push_str(&row(&[
                r.case.clone(),
                format!("**{}**", r.system),
                f(r.get("threads"), 0),
                mib(r.get("idle_rss_kib").unwrap_or(0.0)),
                mib(r.get("load_rss_peak_kib").unwrap_or(0.0)),
                f(r.get("load_msg_per_s"), 0),
                mib(r.get("backlog_rss_kib").unwrap_or(0.0)),
                mib(r.hwm_kib as f64),
                r.get("backlog_store_bytes")
                    .map(|b| format!("{:.1}", b / 1048576.0))
                    .unwrap_or("–".into()),
            ]));
        }
        img(&mut md, "footprint");
        let _ = writeln!(
            md,
            "\nThe same backlog, drained once the upstream is back:\n"
        );
        drain_table(&mut md, "footprint");
        md.push('\n');
    }

    // 4. write
    if !cases(s, "write").is_empty() {
        let _ = writeln!(md, "## 4. Write amplification\n");
        md.push_str(&header(&[
            "case",
            "system",
            "acked",
            "payload bytes",
            "write_bytes",
            "bytes written / payload byte",
            "store after stop KiB",
            "CPU µs/msg",
            "lost",
        ]));
        for r in s.runs.iter().filter(|r| r.scenario == "write") {
            if r.error.is_some() {
                md.push_str(&failed_row(r, 9));
                continue;
            }
            md.push_str(&row(&[
                r.case.clone(),
                format!("**{}**", r.system),
                int(r.acked),
                int(r.acked * r.payload as u64),
                int(r.write_bytes),
                f(r.write_amp, 2),
                r.get("store_bytes_after_stop")
                    .map(|b| format!("{:.1}", b / 1024.0))
                    .unwrap_or("–".into()),
                f(r.cpu_us_per_msg, 1),
                int(r.lost),
            ]));
        }
        img(&mut md, "write");
        md.push('\n');
    }

    // 5. idle
    if !cases(s, "idle").is_empty() {
        let _ = writeln!(md, "## 5. Idle cost: upstream connected, no traffic\n");
        md.push_str(&header(&[
            "case",
            "system",
            "context switches/s",
            "CPU ms/s",
            "CPU %",
            "threads",
            "RSS MiB",
            "disk writes B/s",
        ]));
        for r in s.runs.iter().filter(|r| r.scenario == "idle") {
            if r.error.is_some() {
                md.push_str(&failed_row(r, 8));
                continue;
            }
            md.push_str(&row(&[
                r.case.clone(),
                format!("**{}**", r.system),
                f(r.get("ctxsw_per_s"), 1),
                f(r.get("cpu_ms_per_s"), 2),
                f(r.get("cpu_ms_per_s").map(|v| v / 10.0), 3),
                f(r.get("threads"), 0),
                mib(r.rss_kib as f64),
                f(r.get("write_bytes_per_s"), 0),
            ]));
        }
        img(&mut md, "idle");
        md.push('\n');
    }

    let notes: Vec<String> = s
        .runs
        .iter()
        .flat_map(|r| {
            r.notes
                .iter()
                .map(move |n| format!("- {} / {} / {}: {n}", r.scenario, r.case, r.system))
        })
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(md, "## Notes from this run\n\n{}\n", notes.join("\n"));
    }
    let _ = writeln!(
        md,
        "Raw results: [`bench/results.json`](bench/results.json).\n\n{END}"
    );
    md
}

const PREAMBLE: &str = "# Benchmarks\n\nGenerated by `cargo bench --bench proof -- --docs`.\n\n";

/// Writes docs/bench/{results.json,*.png} and the generated section of docs/BENCHMARKS.md.
pub fn write_docs(s: &Suite, root: &Path) -> Result<()> {
    let docs = root.join("docs");
    let bench = docs.join("bench");
    fs::create_dir_all(&bench)?;
    fs::write(bench.join("results.json"), serde_json::to_string_pretty(s)?)?;
    let plots = match plot_all(s, &bench) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("proof: plots skipped: {e:#}");
            Vec::new()
        }
    };
    let sec = section(s, &plots);
    let path = docs.join("BENCHMARKS.md");
    let old = fs::read_to_string(&path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(a), Some(b)) if b > a => {
            format!("{}{}{}", &old[..a], sec.trim_end(), &old[b + END.len()..])
        }
        _ if old.is_empty() => format!("{PREAMBLE}{sec}"),
        _ => format!("{}\n\n{sec}", old.trim_end()),
    };
    fs::write(&path, new)?;
    eprintln!("docs: {} and {}", path.display(), bench.display());
    Ok(())
}
