//! The command line as an operator uses it: `check` and `run` on good and bad inputs.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

use common::{free_port, wait_for, Daemon, DaemonConfig, WAIT};

fn edgeferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(args)
        .output()
        .expect("run edgeferry")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn valid_config(dir: &Path) -> String {
    format!(
        "[gateway]\nid = \"gw\"\n[local]\nlisten = \"127.0.0.1:{}\"\n[store]\npath = \"{}\"\n\
         [upstream]\naddress = \"127.0.0.1:{}\"\n[[route]]\nfrom = \"devices/#\"\n",
        free_port(),
        dir.join("q.db").display(),
        free_port()
    )
}

#[test]
fn version_prints_the_crate_version() {
    let o = edgeferry(&["--version"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn check_accepts_the_example_config() {
    let o = edgeferry(&[
        "check",
        "--config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/edgeferry.toml"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn check_and_run_reject_broken_configs_with_one_line_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_config(dir.path());
    let cases = [
        (
            good.replace("[[route]]\nfrom = \"devices/#\"\n", ""),
            "route",
        ),
        (
            good.replace("id = \"gw\"", "id = \"gw\"\ncolour = \"blue\""),
            "gateway",
        ),
        (
            good.replace("[upstream]\n", "[upstream]\nprotocol = \"mqtt4\"\n"),
            "upstream.protocol",
        ),
        (
            good.replace("[upstream]\n", "[upstream]\nkeepalive = \"forever\"\n"),
            "upstream.keepalive",
        ),
        (good.replace("devices/#", "devices/#/x"), "route[0].from"),
        (
            good.replace(
                "[upstream]\n",
                "[upstream]\ntls = true\nca_file = \"/no/such/ca.pem\"\n",
            ),
            "upstream.ca_file",
        ),
        ("this is not toml".to_string(), "line 1"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        for cmd in ["check", "run"] {
            let o = edgeferry(&[cmd, "--config", path.to_str().unwrap()]);
            assert_eq!(o.status.code(), Some(78), "{cmd} {key}: {}", stderr(&o));
            let err = stderr(&o);
            assert_eq!(
                err.trim_end().lines().count(),
                1,
                "{cmd}: one line expected: {err}"
            );
            assert!(
                err.contains(path.to_str().unwrap()),
                "{cmd}: names the file: {err}"
            );
            assert!(err.contains(key), "{cmd}: names {key}: {err}");
        }
    }
    assert!(
        !dir.path().join("q.db").exists(),
        "run must not create the store for a bad config"
    );
    let o = edgeferry(&["check", "--config", "/no/such/file.toml"]);
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("/no/such/file.toml"));
}

#[test]
fn run_refuses_a_corrupt_store_and_leaves_it_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, valid_config(dir.path())).unwrap();
    let db = dir.path().join("q.db");
    let garbage: Vec<u8> = (0..20_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&db, &garbage).unwrap();
    let o = edgeferry(&["run", "--config", cfg.to_str().unwrap()]);
    // 78: systemd does not restart into the same refusal.
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(db.to_str().unwrap()) && err.contains("left untouched"),
        "{err}"
    );
    assert_eq!(std::fs::read(&db).unwrap(), garbage);
}

#[test]
fn run_with_the_local_port_taken_fails_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text = valid_config(dir.path()).replace(
        "listen = \"127.0.0.1:",
        &format!("listen = \"127.0.0.1:{port}\"\n#"),
    );
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, text).unwrap();
    let o = edgeferry(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("local.listen"), "{}", stderr(&o));
}

#[test]
fn run_with_a_missing_store_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let text = valid_config(dir.path()).replace(
        dir.path().join("q.db").to_str().unwrap(),
        "/nonexistent-edgeferry/q.db",
    );
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, text).unwrap();
    let o = edgeferry(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/nonexistent-edgeferry does not exist"),
        "{}",
        stderr(&o)
    );
}

/// Run `check` and `run` on `text` and assert both refuse it with exit 78 and one line naming
/// the file and containing each of `needles` (the key first).
fn assert_refused(dir: &Path, name: &str, text: &str, needles: &[&str]) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    for cmd in ["check", "run"] {
        let o = edgeferry(&[cmd, "--config", path.to_str().unwrap()]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(78), "{cmd} {name}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{cmd}: one line: {err}");
        assert!(
            err.contains(path.to_str().unwrap()),
            "{cmd}: names the file: {err}"
        );
        for n in needles {
            assert!(err.contains(n), "{cmd} {name}: expected {n:?} in: {err}");
        }
    }
}

/// `log_level = "verbose"` used to pass `check`; tracing reads it as a filter for a module named
/// "verbose", and the daemon then logged nothing at all, ERROR included.
#[test]
fn a_log_level_that_names_no_level_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = valid_config(dir.path()) + "[telemetry]\nlog_level = \"verbose\"\n";
    assert_refused(
        dir.path(),
        "verbose.toml",
        &text,
        &["telemetry.log_level", "\"verbose\" is not a log level"],
    );
}

/// A number too large for any TOML integer used to be reported at "(top level)".
#[test]
fn a_number_too_large_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = valid_config(dir.path()).replace(
        "[upstream]\n",
        "[upstream]\ninflight = 99999999999999999999\n",
    );
    assert_refused(
        dir.path(),
        "huge.toml",
        &text,
        &["upstream.inflight", "too large", "line "],
    );
}

/// A host name where a listen address is expected used to say only "invalid socket address
/// syntax".
#[test]
fn a_host_name_as_listen_address_asks_for_an_ip_address() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_config(dir.path());
    let at = good.find("listen = ").unwrap();
    let end = at + good[at..].find('\n').unwrap();
    let text = format!("{}listen = \"localhost:1883\"{}", &good[..at], &good[end..]);
    assert_refused(
        dir.path(),
        "localhost.toml",
        &text,
        &[
            "local.listen",
            "\"localhost:1883\" is not an IP address and port",
        ],
    );
}

/// A RUST_LOG that names no level would silence the daemon; it is ignored with a warning on
/// stderr and the configured level applies.
#[test]
fn a_rust_log_that_names_no_level_is_ignored_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::new("v5", free_port());
    cfg.env = vec![("RUST_LOG".into(), "verbose".into())];
    let mut d = Daemon::start(dir.path(), &cfg);
    assert_eq!(d.terminate(), Some(0));
    let log = d.log_text();
    assert!(
        log.contains("warning: RUST_LOG \"verbose\" is not a log level")
            && log.contains("ignoring RUST_LOG"),
        "{log}"
    );
    // The harness configures log_level = "debug": the daemon logs as usual.
    assert!(log.contains("INFO edgeferry running"), "{log}");
    assert!(log.contains("INFO stopped"), "{log}");
}

/// The store holds every device's payloads: its files are created owner-only whatever the
/// umask (the package's unit sets 0027, but a daemon started from a shell has 022).
#[test]
fn store_files_are_created_owner_only_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let text = valid_config(dir.path());
    let local: u16 = text
        .split("listen = \"127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    std::fs::write(&cfg, text).unwrap();
    let db = dir.path().join("q.db");
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Stop(
        Command::new("sh")
            .args(["-c", "umask 022 && exec \"$0\" run --config \"$1\""])
            .arg(env!("CARGO_BIN_EXE_edgeferry"))
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the daemon to accept devices", WAIT, || {
        std::net::TcpStream::connect(("127.0.0.1", local))
            .ok()
            .map(|_| ())
    });
    // In WAL mode, with the daemon running, all three files exist.
    for suffix in ["", "-wal", "-shm"] {
        let f = dir.path().join(format!("q.db{suffix}"));
        let mode = std::fs::metadata(&f)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{} is {:o}", f.display(), mode & 0o777);
    }
    let pid = child.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let mode = std::fs::metadata(&db).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// The unit's comment on TimeoutStopSec states the default shutdown grace (it said 10 s while
/// the default was 5 s), and the stop timeout leaves room above the grace.
#[test]
fn the_unit_file_states_the_default_shutdown_grace() {
    let unit = include_str!("../packaging/edgeferry.service");
    let grace = edgeferry::config::Shutdown::default().grace.0.as_secs();
    assert!(
        unit.contains(&format!("[shutdown] grace\n# (default {grace}s)")),
        "the unit's TimeoutStopSec comment must state the default grace, {grace}s"
    );
    let example = include_str!("../config/edgeferry.toml");
    assert!(example.contains(&format!("grace = \"{grace}s\"")));
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim_end_matches('s').parse().ok())
        .expect("TimeoutStopSec in seconds");
    assert!(
        stop >= 2 * grace,
        "TimeoutStopSec={stop}s leaves no room above {grace}s"
    );
}

/// README's "Install on a gateway" names the package, config path, unit and commands the
/// packaging actually produces.
#[test]
fn the_readme_install_section_matches_the_package() {
    let readme = include_str!("../README.md");
    let cargo = include_str!("../Cargo.toml");
    let section = readme
        .split("## Install on a gateway")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has an \"Install on a gateway\" section");
    for needle in [
        "apt install ./edgeferry_",
        "/etc/edgeferry/edgeferry.toml",
        "edgeferry check --config /etc/edgeferry/edgeferry.toml",
        "systemctl enable --now edgeferry",
        "journalctl -u edgeferry",
        "packaging/README.md",
        "/var/lib/edgeferry",
    ] {
        assert!(section.contains(needle), "install section lacks {needle:?}");
    }
    // What the section promises is what the package ships.
    assert!(cargo.contains("\"etc/edgeferry/edgeferry.toml\""));
    assert!(cargo.contains("unit-name = \"edgeferry\""));
    assert!(
        include_str!("../packaging/build-debs.sh").contains("edgeferry_${VERSION}-1_${arch}.deb")
    );
    assert!(include_str!("../packaging/edgeferry.service").contains("StateDirectory=edgeferry"));
}

/// `edgeferry queue`: every bad argument, a missing store, a store from a newer schema and a
/// config that is not valid each get one line on standard error and their own exit status
/// (64 usage, 66 no store, 78 store or config unusable), and change nothing.
#[test]
fn queue_bad_input_gets_one_line_and_an_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, valid_config(dir.path())).unwrap();
    let c = cfg.to_str().unwrap();
    let one_line = |o: &Output, code: i32, needle: &str| {
        let err = stderr(o);
        assert_eq!(o.status.code(), Some(code), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.contains(needle), "{needle:?} in {err}");
    };
    // No store yet.
    one_line(
        &edgeferry(&["queue", "--config", c, "stats"]),
        66,
        "no such file",
    );
    // Make one: start and stop the daemon.
    let mut d = Daemon::start(dir.path(), &DaemonConfig::new("v5", free_port()));
    let c2 = d.config_path.to_str().unwrap().to_string();
    assert_eq!(d.terminate(), Some(0));
    let c = c2.as_str();
    for (args, needle) in [
        (vec!["stats", "--bogus"], "--bogus"),
        (vec!["frobnicate"], "frobnicate"),
        (vec!["peek", "--limit", "many"], "many"),
        (vec!["peek", "--route", "nowhere"], "nowhere"),
        (vec!["purge", "--route", "devices/#"], "--older-than"),
        (
            vec!["purge", "--route", "devices/#", "--older-than", "soon"],
            "soon",
        ),
        (
            vec!["purge", "--route", "devices/#", "--older-than", "1h"],
            "--yes",
        ),
        (vec!["dead-letters", "replay"], "--all"),
        (vec!["dead-letters", "purge", "--all"], "--yes"),
        (vec!["dead-letters", "show", "12"], "no dead letter"),
        (vec!["dead-letters", "show", "x"], "x"),
    ] {
        let mut full = vec!["queue", "--config", c];
        full.extend(&args);
        one_line(&edgeferry(&full), 64, needle);
    }
    // Good input, for contrast: JSON that parses.
    let o = edgeferry(&["queue", "--config", c, "--json", "stats"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["routes"].is_array());
    assert!(
        v["routes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["route"] != "(before v3)"),
        "a store created by this version lists the empty pre-schema-3 placeholder: {v}"
    );
    // A store from a newer schema.
    let db = d.db_path();
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("PRAGMA user_version = 99").unwrap();
    }
    one_line(
        &edgeferry(&["queue", "--config", c, "stats"]),
        78,
        "newer than this edgeferry",
    );
    // A config that does not validate.
    std::fs::write(dir.path().join("bad.toml"), "[gateway]\n").unwrap();
    one_line(
        &edgeferry(&[
            "queue",
            "--config",
            dir.path().join("bad.toml").to_str().unwrap(),
            "stats",
        ]),
        78,
        "bad.toml",
    );
}
