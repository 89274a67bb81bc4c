//! The operator's queue end to end: bounds and overflow, expiry into the dead letters, and
//! `edgeferry queue` (stats, export, dead-letters replay, purge) against a running daemon while
//! devices publish. Real daemon, real SQLite file, real upstream broker behind a link that can
//! be cut.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Run `edgeferry queue --config CONFIG --json ARGS...`; the exit code and standard output.
fn queue(config: &Path, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .arg("queue")
        .arg("--config")
        .arg(config)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn stats(config: &Path) -> serde_json::Value {
    let (code, out, err) = queue(config, &["stats"]);
    assert_eq!(code, 0, "queue stats: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("stats is not JSON ({e}): {out}"))
}

fn route<'a>(stats: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    stats["routes"]
        .as_array()?
        .iter()
        .find(|r| r["route"] == name)
}

fn num(v: Option<&serde_json::Value>, path: &[&str]) -> i64 {
    let mut v = match v {
        Some(v) => v,
        None => return 0,
    };
    for p in path {
        v = &v[*p];
    }
    v.as_i64().unwrap_or(0)
}

/// JSON lines of `export` / `dead-letters list`.
fn lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn file_bytes(db: &Path) -> u64 {
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    len(db) + len(&db.with_extension("db-wal"))
}

/// A long outage squeezed into a small store: the oldest are dropped and counted, every newer
/// message is kept in order, and the file stays within the bound. Tolerance: the WAL
/// (journal_size_limit 16MiB, but here it is checkpointed at 1000 pages, ~4MiB) plus 25% for
/// b-tree slack beyond the 64 bytes per row that are accounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_drops_the_oldest_counts_them_and_keeps_the_file_bounded() {
    let up = Upstream::start(BrokerKind::Rumqttd);
    let collector = Collector::start(up.v5, "up/#").await;
    let link = LinkProxy::start(up.v5, false);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::new("v5", link.port);
    cfg.store_extra = "max_bytes = \"1MiB\"\nmin_free = \"0%\"\n".into();
    cfg.routes =
        "[[route]]\nfrom = \"devices/#\"\nto = \"up/{topic}\"\nname = \"telemetry\"\n".into();
    let d = Daemon::start(dir.path(), &cfg);

    // 4000 messages of ~1 KiB: about four times what fits.
    let all: Vec<Vec<u8>> = (0..4000)
        .map(|i| format!("{i:06}/{}", "x".repeat(1000)).into_bytes())
        .collect();
    let mut peak = 0;
    for chunk in all.chunks(500) {
        publish_all(d.local, "dev-flood", "devices/flood", chunk.to_vec()).await;
        peak = peak.max(file_bytes(&d.db_path()));
    }
    d.wait_metric("edgeferry_committed_total", all.len() as u64);

    let s = stats(&d.config_path);
    let r = route(&s, "telemetry").expect("route telemetry in stats");
    let depth = num(Some(r), &["depth"]);
    let dropped = num(Some(r), &["dropped", "overflow"]);
    assert_eq!(
        depth + dropped,
        all.len() as i64,
        "every message kept or counted: {r}"
    );
    assert!(dropped > 2000, "most were dropped: {r}");
    // Accounted per message: topic "up/devices/flood" (16) + payload (1007) + 64.
    assert!(depth * 1087 <= 1 << 20, "depth {depth} is within max_bytes");
    assert!(r["dropped_first_ms"].as_i64().is_some() && r["dropped_last_ms"].as_i64().is_some());
    let bound = (1u64 << 20) * 5 / 4 + (5 << 20);
    assert!(
        peak <= bound,
        "store file peaked at {peak} bytes (bound {bound})"
    );
    eprintln!("FIGURE overflow: 4000 x 1 KiB into max_bytes 1MiB: kept {depth}, dropped {dropped}, file peak {peak} bytes");

    // What is kept is exactly the newest messages, in order.
    let (code, out, err) = queue(&d.config_path, &["export", "--route", "telemetry"]);
    assert_eq!(code, 0, "{err}");
    let kept: Vec<String> = lines(&out)
        .iter()
        .map(|l| l["payload"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = all[all.len() - kept.len()..]
        .iter()
        .map(|p| String::from_utf8(p.clone()).unwrap())
        .collect();
    assert_eq!(kept, want, "the kept messages are the newest ones");
    assert_eq!(kept.len() as i64, depth);

    // They all arrive once the link is back.
    link.set_up(true);
    let want: Vec<Vec<u8>> = want.into_iter().map(String::into_bytes).collect();
    collector.wait_all(&want, Duration::from_secs(30)).await;
    assert!(d.metric("edgeferry_queue_dropped_total{reason=\"overflow\"}") == dropped as u64);
}

/// Messages past their route's ttl move to the dead letters (reason "expired"); `dead-letters
/// replay` puts them back under their original ids and the running daemon sends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_become_dead_letters_and_replay_sends_them_with_their_ids() {
    let up = Upstream::start(BrokerKind::Rumqttd);
    let collector = Collector::start(up.v5, "up/#").await;
    let link = LinkProxy::start(up.v5, false);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::new("v5", link.port);
    cfg.routes =
        "[[route]]\nfrom = \"alarms/#\"\nto = \"up/{topic}\"\nname = \"alarms\"\nttl = \"3s\"\n\
                  [[route]]\nfrom = \"devices/#\"\nto = \"up/{topic}\"\n"
            .into();
    let d = Daemon::start(dir.path(), &cfg);
    let alarms = payloads("alarm", 20);
    publish_all(d.local, "dev-alarm", "alarms/a", alarms.clone()).await;
    wait_for("alarms to expire", Duration::from_secs(30), || {
        let s = stats(&d.config_path);
        (num(route(&s, "alarms"), &["dead_letters", "expired"]) == 20).then_some(())
    });
    let s = stats(&d.config_path);
    assert_eq!(num(route(&s, "alarms"), &["depth"]), 0);
    assert_eq!(num(route(&s, "alarms"), &["dropped", "expired"]), 20);
    assert_eq!(
        d.metric("edgeferry_dead_lettered_total{reason=\"expired\"}"),
        20
    );

    let (code, out, err) = queue(
        &d.config_path,
        &["dead-letters", "list", "--route", "alarms"],
    );
    assert_eq!(code, 0, "{err}");
    let dead = lines(&out);
    assert_eq!(dead.len(), 20);
    assert!(
        dead.iter().all(|l| l["dead"]["reason"] == "expired"),
        "{out}"
    );
    let seqs: HashSet<i64> = dead.iter().map(|l| l["seq"].as_i64().unwrap()).collect();

    // Newer traffic on another route moves the forwarder's position past the dead letters.
    link.set_up(true);
    let live = payloads("live", 50);
    publish_all(d.local, "dev-live", "devices/live", live.clone()).await;
    collector.wait_all(&live, Duration::from_secs(30)).await;

    let (code, out, err) = queue(
        &d.config_path,
        &["dead-letters", "replay", "--route", "alarms"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "{\"replayed\":20}");
    let got = collector.wait_all(&alarms, Duration::from_secs(10)).await;
    // Their ids are the original ones: "{gateway}-{epoch}-{seq}".
    let ids: HashSet<i64> = got
        .iter()
        .filter(|r| r.topic.starts_with("up/alarms"))
        .filter_map(|r| r.id.as_ref()?.rsplit('-').next()?.parse().ok())
        .collect();
    assert_eq!(ids, seqs, "replayed under their original seqs");
    let s = stats(&d.config_path);
    wait_for(
        "the replayed alarms to be acknowledged",
        Duration::from_secs(10),
        || {
            let s = stats(&d.config_path);
            (num(route(&s, "alarms"), &["depth"]) == 0).then_some(())
        },
    );
    assert_eq!(num(route(&s, "alarms"), &["dead_letters", "expired"]), 0);
}

/// `purge` removes a route's old messages while devices publish on another: the purged are
/// counted and never sent, nothing else is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_while_devices_publish_loses_nothing_else() {
    let up = Upstream::start(BrokerKind::Rumqttd);
    let collector = Collector::start(up.v5, "up/#").await;
    let link = LinkProxy::start(up.v5, false);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::new("v5", link.port);
    cfg.routes = "[[route]]\nfrom = \"old/#\"\nto = \"up/{topic}\"\nname = \"old\"\n\
                  [[route]]\nfrom = \"devices/#\"\nto = \"up/{topic}\"\nname = \"live\"\n"
        .into();
    let d = Daemon::start(dir.path(), &cfg);
    publish_all(d.local, "dev-old", "old/x", payloads("old", 300)).await;
    tokio::time::sleep(Duration::from_millis(1200)).await; // let them age past --older-than
    let live = payloads("live", 3000);
    let port = d.local;
    let l2 = live.clone();
    let device = tokio::spawn(async move {
        for (i, chunk) in l2.chunks(300).enumerate() {
            publish_all(
                port,
                format!("dev-live-{i}"),
                "devices/live",
                chunk.to_vec(),
            )
            .await;
        }
    });
    // Without --yes and without a terminal: refused, nothing changed.
    let (code, _, err) = queue(
        &d.config_path,
        &["purge", "--route", "old", "--older-than", "1s"],
    );
    assert_eq!(code, 64, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, out, err) = queue(
        &d.config_path,
        &["purge", "--route", "old", "--older-than", "1s", "--yes"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "{\"purged\":300}");
    device.await.unwrap();
    link.set_up(true);
    let got = collector.wait_all(&live, Duration::from_secs(60)).await;
    assert!(
        !got.iter().any(|r| r.topic.starts_with("up/old")),
        "a purged message was sent"
    );
    let s = stats(&d.config_path);
    assert_eq!(num(route(&s, "old"), &["dropped", "purged"]), 300);
    assert_eq!(num(route(&s, "old"), &["depth"]), 0);
    wait_for("live drained", Duration::from_secs(10), || {
        (num(route(&stats(&d.config_path), "live"), &["depth"]) == 0).then_some(())
    });
}

/// The shipped Grafana dashboard is valid JSON, and every metric it queries is one the daemon
/// exports (after a message, an upstream PUBACK and a dead letter, so labelled series exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_json_parses_and_every_metric_it_uses_is_exported() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/grafana-dashboard.json"
    ))
    .unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert!(dash["panels"].as_array().is_some_and(|p| p.len() >= 6));

    let up = Upstream::start(BrokerKind::Rumqttd);
    let collector = Collector::start(up.v5, "up/#").await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &DaemonConfig::new("v5", up.v5));
    let p = payloads("dash", 5);
    publish_all(d.local, "dev-dash", "devices/dash", p.clone()).await;
    collector.wait_all(&p, Duration::from_secs(20)).await;
    let exported: HashSet<String> = wait_for("per-route gauges", Duration::from_secs(10), || {
        let names: HashSet<String> = scrape(d.metrics)?
            .keys()
            .map(|k| k.split('{').next().unwrap_or(k).to_string())
            .collect();
        names
            .contains("edgeferry_queue_route_depth")
            .then_some(names)
    });
    let mut used = HashSet::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("edgeferry_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        used.insert(name);
    }
    assert!(used.len() >= 10, "{used:?}");
    // Labelled families with no series yet (no dead letter so far) are declared by # TYPE.
    let raw = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", d.metrics)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut t = String::new();
        s.read_to_string(&mut t).unwrap();
        t
    };
    for name in &used {
        assert!(
            exported.contains(name) || raw.contains(&format!("# TYPE {name} ")),
            "the dashboard uses {name}, which /metrics does not export"
        );
    }
}

/// A tmpfs, unmounted on drop; None where this machine does not let us mount.
struct Tmpfs {
    dir: std::path::PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .ok()?;
        if !o.status.success() {
            eprintln!("SKIPPED: cannot mount a tmpfs here");
            return None;
        }
        Some(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// `store.min_free` on a small filesystem: an outage fills the queue until half the tmpfs is
/// left, then the oldest are dropped and counted; commits never fail, devices keep getting
/// PUBACKs, the newest are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_free_keeps_space_on_a_small_filesystem_by_dropping_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("disk"), "16m") else {
        return;
    };
    let up = Upstream::start(BrokerKind::Rumqttd);
    let link = LinkProxy::start(up.v5, false);
    let mut cfg = DaemonConfig::new("v5", link.port);
    cfg.store_path = Some(disk.dir.join("queue.db"));
    cfg.store_extra = "min_free = \"8MiB\"\n".into();
    let d = Daemon::start(dir.path(), &cfg);
    let all: Vec<Vec<u8>> = (0..40_000)
        .map(|i| format!("{i:06}/{}", "y".repeat(200)).into_bytes())
        .collect();
    for chunk in all.chunks(2000) {
        publish_all(d.local, "dev-fill", "devices/fill", chunk.to_vec()).await;
    }
    d.wait_metric("edgeferry_committed_total", all.len() as u64);
    assert_eq!(d.metric("edgeferry_store_commit_errors_total"), 0);
    let dropped = d.metric("edgeferry_queue_dropped_total{reason=\"overflow\"}");
    assert!(dropped > 0, "nothing dropped: min_free not enforced");
    let used = file_bytes(&d.db_path());
    let free = {
        let o = Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&disk.dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    eprintln!("FIGURE min_free: 40000 x 207 B on a 16MiB tmpfs with min_free 8MiB: dropped {dropped}, store {used} bytes, {free} bytes free");
    // Tolerance: the check runs once a second and a commit group in between may overshoot.
    assert!(free >= 7 << 20, "only {free} bytes left free");
    let (code, out, err) = queue(&d.config_path, &["export"]);
    assert_eq!(code, 0, "{err}");
    let kept = lines(&out);
    let last = kept.last().unwrap()["payload"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        last.as_bytes(),
        all.last().unwrap().as_slice(),
        "the newest is kept"
    );
    assert_eq!(kept.len() as u64 + dropped, all.len() as u64);
}

/// A disk already below `store.min_free` (something else filled it) must not turn a connected
/// gateway into one that drops every message it commits: the queue keeps a small floor, enough
/// for the forwarder, and everything reaches the upstream with nothing dropped. The operator is
/// told once that the filesystem is below min_free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_gateway_on_a_disk_below_min_free_forwards_everything() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("disk"), "16m") else {
        return;
    };
    // 10 MiB of someone else's data: about 6 MiB left, below the 8 MiB min_free.
    std::fs::write(disk.dir.join("other"), vec![0u8; 10 << 20]).unwrap();
    let up = Upstream::start(BrokerKind::Rumqttd);
    let collector = Collector::start(up.v5, "up/#").await;
    let mut cfg = DaemonConfig::new("v5", up.v5);
    cfg.store_path = Some(disk.dir.join("queue.db"));
    cfg.store_extra = "min_free = \"8MiB\"\n".into();
    let d = Daemon::start(dir.path(), &cfg);
    let all: Vec<Vec<u8>> = (0..5_000)
        .map(|i| format!("{i:05}/{}", "z".repeat(200)).into_bytes())
        .collect();
    for chunk in all.chunks(1000) {
        publish_all(d.local, "dev-tight", "devices/tight", chunk.to_vec()).await;
    }
    collector.wait_all(&all, Duration::from_secs(60)).await;
    assert_eq!(
        d.metric("edgeferry_queue_dropped_total{reason=\"overflow\"}"),
        0,
        "messages dropped while the upstream was taking them"
    );
    assert!(
        d.log_text().contains("below store.min_free"),
        "the operator was not told the disk is below min_free"
    );
}
