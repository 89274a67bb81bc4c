//! The proof suite: edgeferry against Mosquitto's bridge, side by side, on one machine.
//!
//! `cargo bench --bench proof -- --help` lists the flags; docs/BENCHMARKS.md says what each
//! scenario measures and how to regenerate it. Layout:
//! - `sut`: the processes (upstream Mosquitto fixture, edgeferry, Mosquitto bridge), started on
//!   127.0.0.1 in private temp dirs and always stopped by PID with bounded waits;
//! - `load`: device clients (rumqttc, QoS 1, bounded window, fixed or max rate) and the upstream
//!   subscriber (ids, losses, duplicates, latency);
//! - `procfs`: CPU, RSS, context switches and disk writes of the system under test;
//! - `report`: the results table, JSON, gnuplot PNGs and the BENCHMARKS.md section.
//!
//! Every wait has a timeout and every loop ends by itself; all traffic stays on 127.0.0.1.

mod load;
mod procfs;
mod report;
mod sut;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use load::{LoadSpec, Subscriber};
use report::{RunResult, Suite};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use sut::{Kind, MosqSettings, Sut, Upstream};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    All,
    Online,
    Outage,
    Footprint,
    Write,
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SystemArg {
    Edgeferry,
    Mosquitto,
    Both,
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "proof",
    about = "edgeferry vs Mosquitto's bridge: the proof-suite benchmarks"
)]
struct Args {
    /// Scenarios to run (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    scenario: Vec<Scenario>,
    /// Which systems to measure.
    #[arg(long, value_enum, default_value = "both")]
    system: SystemArg,
    /// Payload sizes in bytes (comma-separated; min 16). Online and write use all of them,
    /// outage and footprint the first.
    #[arg(long, value_delimiter = ',', default_value = "64,1024")]
    payload: Vec<usize>,
    /// Offered rate of the fixed-rate cases, msg/s (all clients together).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds each online/load phase publishes for.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Device clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Unacknowledged QoS 1 publishes allowed per device client.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Messages published while the upstream is down (outage scenario).
    #[arg(long, default_value_t = 100_000)]
    outage_total: u64,
    /// Backlog for the footprint scenario's "RSS with backlog" figure.
    #[arg(long, default_value_t = 1_000_000)]
    backlog: u64,
    /// Seconds of idle measurement.
    #[arg(long, default_value_t = 60.0)]
    idle_secs: f64,
    /// Upper bound on any drain (seconds).
    #[arg(long, default_value_t = 300.0)]
    drain_timeout: f64,
    /// Short everything, for development: duration 3 s, outage 10k, backlog 50k, idle 5 s.
    #[arg(long)]
    quick: bool,
    /// edgeferry binary (default: the one cargo built for this bench).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Mosquitto bridge `autosave_interval`, seconds (Mosquitto's default: 1800).
    #[arg(long, default_value_t = 1800)]
    mosquitto_autosave: u64,
    /// Mosquitto bridge `max_queued_messages` (Mosquitto's default 1000 drops messages in a
    /// long outage; 0 = unlimited, what a store-and-forward user has to set).
    #[arg(long, default_value_t = 0)]
    mosquitto_max_queued: u64,
    /// Machine-readable results.
    #[arg(long, default_value = "target/proof/results.json")]
    out: PathBuf,
    /// Also write docs/BENCHMARKS.md (generated section) and docs/bench/*.png.
    #[arg(long)]
    docs: bool,
    /// Do not run anything: regenerate the table, plots and docs from this results JSON.
    #[arg(long)]
    render: Option<PathBuf>,
    /// Base directory for the private temp dirs (must be a real disk: write_bytes is 0 on tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    workdir: PathBuf,
    /// Keep the temp dirs (configs, logs, stores) for inspection.
    #[arg(long)]
    keep: bool,
    /// Extra lines for edgeferry's `[store]` table, e.g. --store-extra 'sync = "normal"'
    /// (repeatable). Default: none (the shipped defaults).
    #[arg(long)]
    store_extra: Vec<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One system's private world for one run: upstream fixture, upstream subscriber, the system.
struct World {
    _tmp: Option<tempfile::TempDir>,
    dir: PathBuf,
    kind: Kind,
    upstream: Upstream,
    sub: Arc<Subscriber>,
    sut: Option<Sut>,
}

impl Drop for World {
    fn drop(&mut self) {
        self.sub.stop();
        drop(self.sut.take());
        self.upstream.stop();
    }
}

struct Ctx {
    args: Args,
    rt: tokio::runtime::Runtime,
    binary: PathBuf,
    mosq: MosqSettings,
}

impl Ctx {
    fn world(&self, kind: Kind) -> Result<World> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("proof-{}-", kind.name()))
            .tempdir_in(&self.args.workdir)
            .with_context(|| format!("temp dir in {}", self.args.workdir.display()))?;
        let dir = tmp.path().to_path_buf();
        let mut upstream = Upstream::new(&dir)?;
        upstream.start()?;
        let sub = Subscriber::start(&self.rt, upstream.port, "bench-upstream-sub");
        let tmp = if self.args.keep {
            eprintln!("  [keep] {}", tmp.keep().display());
            None
        } else {
            Some(tmp)
        };
        let mut w = World {
            dir: dir.clone(),
            kind,
            _tmp: tmp,
            upstream,
            sub,
            sut: None,
        };
        w.sub.wait_subscribed(Duration::from_secs(10))?;
        w.sut = Some(self.start_sut(&w)?);
        let port = w.sut.as_ref().unwrap().port;
        load::probe_path(&self.rt, port, &w.sub, Duration::from_secs(30)).map_err(|e| {
            let tail = w.sut.as_ref().unwrap().proc.log_tail(15);
            anyhow::anyhow!("{e}\n--- {} log tail ---\n{tail}", kind.name())
        })?;
        Ok(w)
    }

    /// Starts the system under test in the world's dir (again, after a restart: same store).
    fn start_sut(&self, w: &World) -> Result<Sut> {
        match w.kind {
            Kind::Edgeferry => Sut::start_edgeferry(
                &self.binary,
                &w.dir,
                w.upstream.port,
                &self.args.store_extra.join("\n"),
            ),
            Kind::Mosquitto => Sut::start_mosquitto_bridge(&w.dir, w.upstream.port, &self.mosq),
        }
    }

    fn spec(&self, payload: usize, rate: Option<f64>, total: Option<u64>, secs: f64) -> LoadSpec {
        LoadSpec {
            clients: self.args.clients,
            window: self.args.window,
            rate,
            total,
            duration: Duration::from_secs_f64(secs),
            payload,
        }
    }

    fn drain_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.args.drain_timeout)
    }
}

fn new_result(scenario: &str, case: &str, kind: Kind, spec: Option<&LoadSpec>) -> RunResult {
    RunResult {
        scenario: scenario.into(),
        case: case.into(),
        system: kind.name().into(),
        payload: spec.map(|s| s.payload).unwrap_or(0),
        rate: spec.and_then(|s| s.rate),
        clients: spec.map(|s| s.clients).unwrap_or(0),
        window: spec.map(|s| s.window).unwrap_or(0),
        ..Default::default()
    }
}

/// Stops the system gracefully and records how that went and what its store holds after.
fn finish(w: &mut World, r: &mut RunResult) {
    if let Some(mut sut) = w.sut.take() {
        let t = Instant::now();
        let (st, killed) = sut.proc.stop(Duration::from_secs(60));
        r.m("stop_s", t.elapsed().as_secs_f64());
        r.m("store_bytes_after_stop", sut.store_bytes() as f64);
        let code = st.and_then(|s| s.code()).map(|c| c as f64).unwrap_or(-1.0);
        r.m("exit_code", code);
        if killed {
            r.note(format!("{} needed SIGKILL after 60 s", sut.kind.name()));
        } else if code != 0.0 {
            r.note(format!("{} exited {st:?} on SIGTERM", sut.kind.name()));
        }
        if sut.store_bytes() == 0 {
            r.note(format!(
                "no store file at {} after stop",
                sut.store.display()
            ));
        }
    }
}

/// Applies the standard accounting to `r` from the publisher report, subscriber and snapshots.
fn account(
    r: &mut RunResult,
    p: &load::PubReport,
    sub: &Subscriber,
    t_start: Instant,
    s0: &procfs::Snap,
    s1: &procfs::Snap,
) {
    let rep = sub.report();
    r.sent = p.sent;
    r.acked = p.acked;
    r.received = rep.unique;
    r.duplicates = rep.duplicates;
    r.reordered = rep.reordered;
    r.lost = p.acked.saturating_sub(rep.unique);
    r.lat_p50_ms = rep.lat_p50_ms;
    r.lat_p99_ms = rep.lat_p99_ms;
    r.lat_max_ms = rep.lat_max_ms;
    let (_, last) = sub.first_last();
    let span = last
        .map(|l| l.duration_since(t_start).as_secs_f64())
        .unwrap_or(0.0);
    r.duration_s = span;
    r.throughput = if span > 0.0 {
        rep.unique as f64 / span
    } else {
        0.0
    };
    r.cpu_s = s1.cpu_s - s0.cpu_s;
    if p.acked > 0 {
        r.cpu_us_per_msg = Some(r.cpu_s * 1e6 / p.acked as f64);
    }
    r.write_bytes = s1.write_bytes.saturating_sub(s0.write_bytes);
    let accepted = p.acked * r.payload as u64;
    if accepted > 0 {
        r.write_amp = Some(r.write_bytes as f64 / accepted as f64);
    }
    r.rss_kib = s1.rss_kib;
    r.hwm_kib = s1.hwm_kib;
    r.m("ingest_ack_s", p.ack_s);
    if let Some(v) = p.puback_p50_ms {
        r.m("puback_p50_ms", v);
    }
    if let Some(v) = p.puback_p99_ms {
        r.m("puback_p99_ms", v);
    }
    if p.acked > 0 {
        r.m(
            "ctxsw_per_msg",
            s1.ctxsw.saturating_sub(s0.ctxsw) as f64 / p.acked as f64,
        );
    }
    r.m("publisher_conn_errors", p.conn_errors as f64);
    r.m(
        "subscriber_conn_errors",
        sub.conn_errors.load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
}

fn snap(w: &World) -> Result<procfs::Snap> {
    let pid = w.sut.as_ref().map(|s| s.pid()).unwrap_or(0);
    procfs::snap(pid).with_context(|| format!("system under test (pid {pid}) is gone"))
}

/// A connected-upstream load phase: publish per `spec`, wait for everything acked to arrive.
fn load_phase(ctx: &Ctx, w: &World, r: &mut RunResult, spec: &LoadSpec) -> Result<()> {
    w.sub.reset();
    let s0 = snap(w)?;
    let up0 = procfs::cpu_seconds(w.upstream.pid()).unwrap_or(0.0);
    let me0 = procfs::cpu_seconds(std::process::id()).unwrap_or(0.0);
    let sampler =
        procfs::RssSampler::start(w.sut.as_ref().unwrap().pid(), Duration::from_millis(100));
    let t0 = Instant::now();
    let p = load::run_publishers(
        &ctx.rt,
        w.sut.as_ref().unwrap().port,
        spec,
        Duration::from_secs(30),
    )?;
    w.sub
        .wait_for(p.acked, Duration::from_secs(15), ctx.drain_timeout());
    let s1 = snap(w)?;
    account(r, &p, &w.sub, t0, &s0, &s1);
    // Context: what the fixture and the harness burnt on the same 2 cores meanwhile.
    let up1 = procfs::cpu_seconds(w.upstream.pid()).unwrap_or(0.0);
    r.m("upstream_cpu_s", up1 - up0);
    let me1 = procfs::cpu_seconds(std::process::id()).unwrap_or(0.0);
    r.m("harness_cpu_s", me1 - me0);
    r.rss_peak_kib = sampler.peak_kib().max(s1.rss_kib);
    Ok(())
}

fn scenario_online(ctx: &Ctx, kind: Kind) -> Vec<RunResult> {
    let mut out = Vec::new();
    for &payload in &ctx.args.payload {
        for rate in [Some(ctx.args.rate), None] {
            let spec = ctx.spec(payload, rate, None, ctx.args.duration);
            let case = format!(
                "{} @ {}",
                report::size_label(payload),
                rate.map(|r| format!("{r:.0}/s"))
                    .unwrap_or_else(|| "max".into())
            );
            let mut r = new_result("online", &case, kind, Some(&spec));
            let res = (|| -> Result<()> {
                let mut w = ctx.world(kind)?;
                thread::sleep(Duration::from_millis(500));
                load_phase(ctx, &w, &mut r, &spec)?;
                finish(&mut w, &mut r);
                Ok(())
            })();
            out.push(r.done(res));
        }
    }
    out
}

/// Upstream down, publish `total`, upstream up, time the drain. Shared by outage and footprint.
fn backlog_phase(
    ctx: &Ctx,
    w: &mut World,
    r: &mut RunResult,
    total: u64,
    payload: usize,
    restart: bool,
) -> Result<()> {
    w.upstream.stop();
    // Let the system notice the broken link before the load starts.
    thread::sleep(Duration::from_secs(1));
    let spec = ctx.spec(payload, None, Some(total), ctx.args.drain_timeout);
    w.sub.reset();
    let s0 = snap(w)?;
    let sampler =
        procfs::RssSampler::start(w.sut.as_ref().unwrap().pid(), Duration::from_millis(100));
    let t0 = Instant::now();
    let p = load::run_publishers(
        &ctx.rt,
        w.sut.as_ref().unwrap().port,
        &spec,
        Duration::from_secs(30),
    )?;
    let sb = snap(w)?;
    r.m(
        "ingest_msg_per_s",
        if p.ack_s > 0.0 {
            p.acked as f64 / p.ack_s
        } else {
            0.0
        },
    );
    r.m("backlog_rss_kib", sb.rss_kib as f64);
    r.m("backlog_hwm_kib", sb.hwm_kib as f64);
    r.m(
        "backlog_store_bytes",
        w.sut.as_ref().unwrap().store_bytes() as f64,
    );
    r.m(
        "backlog_write_bytes",
        sb.write_bytes.saturating_sub(s0.write_bytes) as f64,
    );
    r.m("received_during_outage", w.sub.unique() as f64);
    // CPU of a process replaced by a restart, counted up to its last reading.
    let mut cpu_before_restart = 0.0;
    let mut s0 = s0;
    if restart {
        // Gateway restart with the backlog queued (SIGTERM, then start on the same store):
        // proves the backlog really is on disk, for both systems.
        cpu_before_restart = sb.cpu_s - s0.cpu_s;
        let mut old = w.sut.take().expect("running");
        let t = Instant::now();
        let (st, killed) = old.proc.stop(Duration::from_secs(60));
        r.m("restart_stop_s", t.elapsed().as_secs_f64());
        r.m("restart_store_bytes", old.store_bytes() as f64);
        if killed || st.and_then(|s| s.code()) != Some(0) {
            r.note(format!("restart: exit {st:?}, killed={killed}"));
        }
        drop(old);
        let t = Instant::now();
        w.sut = Some(ctx.start_sut(w)?);
        r.m("restart_start_s", t.elapsed().as_secs_f64());
        s0 = snap(w)?;
    }
    let t_up = Instant::now();
    w.upstream.start()?;
    // Quiet period longer than Mosquitto's capped reconnect backoff (30 s).
    let series = w
        .sub
        .wait_for(p.acked, Duration::from_secs(60), ctx.drain_timeout());
    let s1 = snap(w)?;
    account(r, &p, &w.sub, t0, &s0, &s1);
    if restart {
        r.cpu_s += cpu_before_restart;
        r.cpu_us_per_msg = (p.acked > 0).then(|| r.cpu_s * 1e6 / p.acked as f64);
        r.note("write_bytes and RSS are the restarted process's only".into());
    }
    r.rss_peak_kib = sampler.peak_kib().max(s1.rss_kib);
    let (first, last) = w.sub.first_last();
    let since = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(t_up).as_secs_f64());
    if let (Some(f), Some(l)) = (since(first), since(last)) {
        r.m("time_to_first_s", f);
        r.m("drain_s", l);
        if l > f {
            r.m("drain_msg_per_s", r.received as f64 / (l - f));
        }
    }
    r.series = series;
    Ok(())
}

fn scenario_outage(ctx: &Ctx, kind: Kind) -> Vec<RunResult> {
    let payload = ctx.args.payload[0];
    let total = ctx.args.outage_total;
    let spec = ctx.spec(payload, None, Some(total), 0.0);
    let case = format!(
        "{} x {}",
        report::count_label(total),
        report::size_label(payload)
    );
    let mut out = Vec::new();
    for restart in [false, true] {
        let case = if restart {
            format!("{case} + gateway restart")
        } else {
            case.clone()
        };
        let mut r = new_result("outage", &case, kind, Some(&spec));
        let res = (|| -> Result<()> {
            let mut w = ctx.world(kind)?;
            backlog_phase(ctx, &mut w, &mut r, total, payload, restart)?;
            finish(&mut w, &mut r);
            Ok(())
        })();
        out.push(r.done(res));
    }
    out
}

fn scenario_footprint(ctx: &Ctx, kind: Kind) -> Vec<RunResult> {
    let payload = ctx.args.payload[0];
    let spec = ctx.spec(payload, None, None, ctx.args.duration);
    let mut r = new_result(
        "footprint",
        &format!("{} backlog", report::count_label(ctx.args.backlog)),
        kind,
        Some(&spec),
    );
    let res = (|| -> Result<()> {
        let mut w = ctx.world(kind)?;
        thread::sleep(Duration::from_secs(3));
        let idle = snap(&w)?;
        r.m("idle_rss_kib", idle.rss_kib as f64);
        r.m("threads", idle.threads as f64);
        let mut lr = r.clone();
        load_phase(ctx, &w, &mut lr, &spec)?;
        r.m("load_rss_peak_kib", lr.rss_peak_kib as f64);
        r.m("load_hwm_kib", lr.hwm_kib as f64);
        r.m("load_msg_per_s", lr.throughput);
        let mut br = r.clone();
        br.payload = payload;
        backlog_phase(ctx, &mut w, &mut br, ctx.args.backlog, payload, false)?;
        // The drain figures of the big backlog are worth keeping too.
        r = RunResult {
            scenario: r.scenario.clone(),
            case: r.case.clone(),
            ..br
        };
        finish(&mut w, &mut r);
        Ok(())
    })();
    vec![r.done(res)]
}

fn scenario_write(ctx: &Ctx, kind: Kind) -> Vec<RunResult> {
    let mut out = Vec::new();
    for &payload in &ctx.args.payload {
        let total = (ctx.args.rate * ctx.args.duration) as u64;
        let spec = ctx.spec(
            payload,
            Some(ctx.args.rate),
            Some(total),
            ctx.args.duration * 3.0,
        );
        let case = format!("{} @ {:.0}/s", report::size_label(payload), ctx.args.rate);
        let mut r = new_result("write", &case, kind, Some(&spec));
        let res = (|| -> Result<()> {
            let mut w = ctx.world(kind)?;
            thread::sleep(Duration::from_millis(500));
            load_phase(ctx, &w, &mut r, &spec)?;
            finish(&mut w, &mut r);
            Ok(())
        })();
        out.push(r.done(res));
    }
    out
}

fn scenario_idle(ctx: &Ctx, kind: Kind) -> Vec<RunResult> {
    let mut r = new_result("idle", &format!("{:.0} s", ctx.args.idle_secs), kind, None);
    let res = (|| -> Result<()> {
        let mut w = ctx.world(kind)?;
        thread::sleep(Duration::from_secs(2));
        let s0 = snap(&w)?;
        let t0 = Instant::now();
        thread::sleep(Duration::from_secs_f64(ctx.args.idle_secs));
        let s1 = snap(&w)?;
        let secs = t0.elapsed().as_secs_f64();
        r.duration_s = secs;
        r.cpu_s = s1.cpu_s - s0.cpu_s;
        r.m("ctxsw_per_s", (s1.ctxsw - s0.ctxsw) as f64 / secs);
        r.m("cpu_ms_per_s", r.cpu_s * 1000.0 / secs);
        r.m("threads", s1.threads as f64);
        r.m(
            "write_bytes_per_s",
            s1.write_bytes.saturating_sub(s0.write_bytes) as f64 / secs,
        );
        r.rss_kib = s1.rss_kib;
        r.hwm_kib = s1.hwm_kib;
        finish(&mut w, &mut r);
        Ok(())
    })();
    vec![r.done(res)]
}

fn run(args: Args) -> Result<()> {
    let manifest = manifest_dir();
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        manifest.join(&args.out)
    };
    if let Some(path) = &args.render {
        let suite: Suite = serde_json::from_str(&std::fs::read_to_string(path)?)
            .with_context(|| format!("reading {}", path.display()))?;
        report::print_table(&suite);
        report::write_docs(&suite, &manifest)?;
        return Ok(());
    }
    if args.payload.iter().any(|p| *p < 16) {
        bail!("--payload: each size must be at least 16 bytes (id + timestamp)");
    }
    let binary = args
        .binary
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edgeferry")));
    // The daemon is started from its temp dir, so a relative --binary must be made absolute.
    let binary =
        std::fs::canonicalize(&binary).with_context(|| format!("--binary {}", binary.display()))?;
    let kinds: Vec<Kind> = match args.system {
        SystemArg::Edgeferry => vec![Kind::Edgeferry],
        SystemArg::Mosquitto => vec![Kind::Mosquitto],
        SystemArg::Both => vec![Kind::Edgeferry, Kind::Mosquitto],
    };
    let scenarios: Vec<Scenario> = if args.scenario.contains(&Scenario::All) {
        vec![
            Scenario::Online,
            Scenario::Outage,
            Scenario::Footprint,
            Scenario::Write,
            Scenario::Idle,
        ]
    } else {
        args.scenario.clone()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    load::anchor();
    let mosq = MosqSettings {
        autosave_interval: args.mosquitto_autosave,
        max_queued_messages: args.mosquitto_max_queued,
    };
    let mut suite = Suite::describe(&command_line(), &binary, &mosq, &args_json(&args));
    let ctx = Ctx {
        args,
        rt,
        binary,
        mosq,
    };
    let started = Instant::now();
    for sc in scenarios {
        for &kind in &kinds {
            eprintln!(
                "== {sc:?} / {} ({:.0} s in)",
                kind.name(),
                started.elapsed().as_secs_f64()
            );
            let runs = match sc {
                Scenario::Online => scenario_online(&ctx, kind),
                Scenario::Outage => scenario_outage(&ctx, kind),
                Scenario::Footprint => scenario_footprint(&ctx, kind),
                Scenario::Write => scenario_write(&ctx, kind),
                Scenario::Idle => scenario_idle(&ctx, kind),
                Scenario::All => unreachable!(),
            };
            for r in &runs {
                eprintln!("   {}", report::one_line(r));
            }
            suite.runs.extend(runs);
        }
    }
    suite.total_s = started.elapsed().as_secs_f64();
    report::print_table(&suite);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&suite)?)?;
    eprintln!("results: {}", out.display());
    if ctx.args.docs {
        report::write_docs(&suite, &manifest)?;
    }
    ctx.rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    format!("cargo bench --bench proof -- {}", args.join(" "))
        .trim_end()
        .to_string()
}

fn args_json(a: &Args) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("clients".into(), a.clients.to_string());
    m.insert("window".into(), a.window.to_string());
    m.insert("rate".into(), a.rate.to_string());
    m.insert("duration_s".into(), a.duration.to_string());
    m.insert("outage_total".into(), a.outage_total.to_string());
    m.insert("backlog".into(), a.backlog.to_string());
    m.insert("idle_s".into(), a.idle_secs.to_string());
    m.insert("payloads".into(), format!("{:?}", a.payload));
    m
}

fn main() {
    let mut args = Args::parse();
    if args.quick {
        args.duration = args.duration.min(3.0);
        args.outage_total = args.outage_total.min(10_000);
        args.backlog = args.backlog.min(50_000);
        args.idle_secs = args.idle_secs.min(5.0);
    }
    if !Path::new("/proc/self/io").exists() {
        eprintln!("proof: /proc/self/io missing; this harness needs Linux procfs");
        std::process::exit(2);
    }
    if let Err(e) = run(args) {
        eprintln!("proof: {e:#}");
        std::process::exit(1);
    }
}
