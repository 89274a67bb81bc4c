//! The upstream link between sessions, end to end with the real daemon and real Mosquitto
//! brokers on loopback: failover to a later address and back, the circuit breaker for refused
//! logins, reaching a flapping upstream in every up phase, and TLS failures named by kind
//! (certificates made with the openssl CLI at test time).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A Mosquitto on a fixed port that can be stopped and started again, with its own config
/// lines and a log of everything it does (CONNACKs are counted from it).
struct Mosquitto {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Mosquitto {
    /// `None` when Mosquitto is not installed (the caller skips).
    fn start(extra: &str) -> Option<Mosquitto> {
        if !mosquitto_available() {
            eprintln!("mosquitto not installed: skipping");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::write(
            dir.path().join("m.conf"),
            format!(
                "listener {port} 127.0.0.1\n{extra}\nuser root\npersistence false\n\
                 log_dest file {}\nlog_type all\n",
                dir.path().join("log").display()
            ),
        )
        .unwrap();
        let mut m = Mosquitto {
            port,
            dir,
            child: None,
        };
        m.spawn();
        Some(m)
    }

    fn spawn(&mut self) {
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("m.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        wait_until_listening(self.port);
    }

    /// SIGTERM by PID, bounded wait, then SIGKILL.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// CONNECT packets answered so far (one CONNACK each, accepted or refused). TCP probes,
    /// which send no CONNECT, are not counted.
    fn connacks(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("log"))
            .unwrap_or_default()
            .matches("Sending CONNACK")
            .count()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn error_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(" ERROR ")).collect()
}

/// A gauge or counter's current value.
fn metric(d: &Daemon, name: &str) -> u64 {
    scrape(d.metrics)
        .and_then(|m| m.get(name).copied())
        .unwrap_or(0)
}

fn wait_metric_eq(d: &Daemon, name: &str, value: u64) {
    wait_for(&format!("{name} == {value}"), WAIT, || {
        (metric(d, name) == value).then_some(())
    });
}

/// Primary and secondary Mosquitto: with the primary stopped, messages go to the secondary;
/// once the primary is back and has answered for failback_after, they go to the primary
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_the_secondary_and_back_to_the_primary() {
    let Some(mut primary) = Mosquitto::start("allow_anonymous true") else {
        return;
    };
    let Some(secondary) = Mosquitto::start("allow_anonymous true") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::new("v5", primary.port);
    cfg.address = Some(format!(
        "[\"127.0.0.1:{}\", \"127.0.0.1:{}\"]",
        primary.port, secondary.port
    ));
    cfg.upstream_extra = "failback_after = \"2s\"".into();
    let d = Daemon::start(dir.path(), &cfg);

    let on_primary = Collector::start(primary.port, "up/#").await;
    d.wait_metric("edgeferry_upstream_connects_total", 1);
    let first = payloads("first", 20);
    publish_all(d.local, "dev-fo", "devices/fo", first.clone()).await;
    on_primary.wait_all(&first, WAIT).await;
    assert_eq!(metric(&d, "edgeferry_upstream_address"), 0);

    // The primary goes away: failover.
    drop(on_primary);
    primary.stop();
    let on_secondary = Collector::start(secondary.port, "up/#").await;
    let second = payloads("second", 20);
    publish_all(d.local, "dev-fo", "devices/fo", second.clone()).await;
    on_secondary.wait_all(&second, WAIT).await;
    assert_eq!(metric(&d, "edgeferry_upstream_address"), 1);
    assert_eq!(metric(&d, "edgeferry_upstream_failovers_total"), 1);

    // The primary returns: after failback_after of answering checks, back to it.
    primary.spawn();
    d.wait_metric("edgeferry_upstream_failbacks_total", 1);
    wait_metric_eq(&d, "edgeferry_upstream_address", 0);
    let on_primary = Collector::start(primary.port, "up/#").await;
    let third = payloads("third", 20);
    publish_all(d.local, "dev-fo", "devices/fo", third.clone()).await;
    on_primary.wait_all(&third, WAIT).await;
    let stray = on_secondary
        .snapshot()
        .into_iter()
        .filter(|r| third.contains(&r.payload))
        .count();
    assert_eq!(
        stray, 0,
        "messages after the failback went to the secondary"
    );
    let log = d.log_text();
    assert_eq!(
        log.matches("upstream failed over").count(),
        1,
        "log:\n{log}"
    );
    assert!(error_lines(&log).is_empty(), "log:\n{log}");
}

/// A Mosquitto with a password file and a gateway with the wrong password: one ERROR naming
/// the reason code, counted by reason, and attempts spaced by at least backoff_max / 2 (the
/// breaker) instead of the outage schedule.
#[test]
fn a_refused_login_gives_one_error_and_no_hammering() {
    for protocol in ["v5", "v3.1.1"] {
        let dir = tempfile::tempdir().unwrap();
        let passwords = dir.path().join("passwords");
        let made = Command::new("mosquitto_passwd")
            .args(["-c", "-b"])
            .arg(&passwords)
            .args(["gw", "right"])
            .status();
        if !matches!(made, Ok(s) if s.success()) {
            eprintln!("mosquitto_passwd not available: skipping");
            return;
        }
        let Some(up) = Mosquitto::start(&format!(
            "allow_anonymous false\npassword_file {}",
            passwords.display()
        )) else {
            return;
        };
        let mut cfg = DaemonConfig::new(protocol, up.port);
        cfg.backoff = ("1s".into(), "10s".into());
        cfg.upstream_extra = "username = \"gw\"\npassword = \"wrong\"".into();
        let d = Daemon::start(dir.path(), &cfg);
        let started = Instant::now();
        // Mosquitto answers a wrong password with "not authorised".
        d.wait_metric(
            "edgeferry_upstream_refusals_total{reason=\"not_authorized\"}",
            1,
        );
        // Watch attempts over a window: with the breaker they are at least 5 s apart, so at
        // most 3 fit in 12 s (on the outage schedule there would be a dozen).
        let window = Duration::from_secs(12);
        std::thread::sleep(window.saturating_sub(started.elapsed()));
        let attempts = up.connacks();
        let log = d.log_text();
        assert!(
            (1..=3).contains(&attempts),
            "{protocol}: {attempts} CONNECTs in {window:?}; log:\n{log}"
        );
        let errors = error_lines(&log);
        assert_eq!(errors.len(), 1, "{protocol}: one ERROR; log:\n{log}");
        let code = if protocol == "v5" {
            "reason code 0x87"
        } else {
            "return code 5"
        };
        assert!(
            errors[0].contains("NotAuthorized") && errors[0].contains(code),
            "{protocol}: the ERROR names the reason code: {}",
            errors[0]
        );
        assert_eq!(metric(&d, "edgeferry_upstream_connects_total"), 0);
    }
}

/// The upstream (Mosquitto itself, stopped and started on the same port) flaps 3 s up / 3 s
/// down; with the default backoff settings the gateway connects in every up phase.
#[test]
fn a_flapping_upstream_is_reached_in_every_up_phase() {
    let Some(mut up) = Mosquitto::start("allow_anonymous true") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::new("v3.1.1", up.port);
    // The shipped defaults.
    cfg.backoff = ("1s".into(), "2m".into());
    let d = Daemon::start(dir.path(), &cfg);
    d.wait_metric("edgeferry_upstream_connects_total", 1);
    let phase = Duration::from_secs(3);
    let mut missed = Vec::new();
    for i in 1..=5 {
        up.stop();
        std::thread::sleep(phase);
        up.spawn();
        let came_up = Instant::now();
        let before = metric(&d, "edgeferry_upstream_connects_total");
        std::thread::sleep(phase.saturating_sub(came_up.elapsed()));
        // Read before the broker goes: a connection counted now happened in this up phase.
        if metric(&d, "edgeferry_upstream_connects_total") == before {
            missed.push(i);
        }
    }
    assert!(
        missed.is_empty(),
        "up phases without a connection: {missed:?}; log:\n{}",
        d.log_text()
    );
}

// ---- TLS ----------------------------------------------------------------------------------

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway PKI made with the openssl CLI in a temp dir: two CAs ("ca", "other-ca") and
/// leaf certificates signed by either.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Option<Pki> {
        if Command::new("openssl").arg("version").output().is_err() {
            eprintln!("openssl not installed: skipping TLS tests");
            return None;
        }
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        pki.ca("ca");
        pki.ca("other-ca");
        Some(pki)
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn ca(&self, name: &str) {
        openssl(
            &self.dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-days",
                "30",
                "-subj",
                &format!("/CN=edgeferry test {name}"),
            ],
        );
    }

    /// `name.pem`/`name.key` signed by `ca` for `san` (e.g. "IP:127.0.0.1"): valid from now for
    /// 30 days or, with `expired`, from 40 days ago for 1 day.
    fn leaf(&self, name: &str, ca: &str, san: &str, expired: bool) {
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        std::fs::write(
            self.dir.join(format!("{name}.ext")),
            format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\n"),
        )
        .unwrap();
        let args = vec![
            "x509".to_string(),
            "-req".into(),
            "-in".into(),
            format!("{name}.csr"),
            "-CA".into(),
            format!("{ca}.pem"),
            "-CAkey".into(),
            format!("{ca}.key"),
            "-CAcreateserial".into(),
            "-out".into(),
            format!("{name}.pem"),
            "-extfile".into(),
            format!("{name}.ext"),
            "-days".into(),
            "30".into(),
        ];
        if expired {
            // A certificate that expired: signed "in the past" with the clock turned back.
            let status = Command::new("faketime")
                .arg("-f")
                .arg("-40d")
                .arg("openssl")
                .args(args.iter().map(|a| {
                    if a == "30" {
                        "1".to_string()
                    } else {
                        a.clone()
                    }
                }))
                .current_dir(&self.dir)
                .output()
                .expect("run faketime openssl");
            assert!(
                status.status.success(),
                "faketime openssl: {}",
                String::from_utf8_lossy(&status.stderr)
            );
            return;
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        openssl(&self.dir, &args);
    }
}

/// A TLS Mosquitto serving `cert`, optionally requiring client certificates from `ca`.
fn tls_broker(pki: &Pki, cert: &str, require_client_cert: bool) -> Option<Mosquitto> {
    Mosquitto::start(&format!(
        "allow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {}",
        pki.path("ca.pem"),
        pki.path(&format!("{cert}.pem")),
        pki.path(&format!("{cert}.key")),
        require_client_cert
    ))
}

/// Start a TLS daemon against `up` with `tls_lines` and wait for the TLS failure `reason`;
/// returns its ERROR lines.
fn tls_failure(dir: &Path, up: &Mosquitto, tls_lines: &str, reason: &str) -> Vec<String> {
    let mut cfg = DaemonConfig::new("v5", up.port);
    cfg.upstream_extra = format!("tls = true\n{tls_lines}");
    let d = Daemon::start(dir, &cfg);
    let name = format!("edgeferry_upstream_tls_failures_total{{reason=\"{reason}\"}}");
    let deadline = Instant::now() + WAIT;
    while metric(&d, &name) == 0 {
        assert!(
            Instant::now() < deadline,
            "no {name}; log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(&d, "edgeferry_upstream_connects_total"), 0);
    let log = d.log_text();
    error_lines(&log).into_iter().map(String::from).collect()
}

/// Each kind of TLS failure is named, with the file or host at fault, in one ERROR and in
/// edgeferry_upstream_tls_failures_total{reason}; the right CA connects.
#[test]
fn tls_failures_say_which_it_is() {
    if !mosquitto_available() {
        eprintln!("mosquitto not installed: skipping");
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let Some(pki) = Pki::new(certs.path()) else {
        return;
    };
    pki.leaf("server", "ca", "IP:127.0.0.1", false);
    pki.leaf("elsewhere", "ca", "DNS:elsewhere.example", false);
    pki.leaf("client", "other-ca", "DNS:gw-test", false);
    let faketime = Command::new("faketime").arg("--version").output().is_ok();
    if faketime {
        pki.leaf("expired", "ca", "IP:127.0.0.1", true);
    } else {
        eprintln!("faketime not installed: the expired-certificate case is skipped");
    }
    let ca = pki.path("ca.pem");
    let other_ca = pki.path("other-ca.pem");

    // The right CA: connected (the set-up itself works).
    let up = tls_broker(&pki, "server", false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::new("v5", up.port);
    cfg.upstream_extra = format!("tls = true\nca_file = \"{ca}\"");
    let d = Daemon::start(dir.path(), &cfg);
    d.wait_metric("edgeferry_upstream_connects_total", 1);
    drop(d);

    // A CA that did not sign the server's certificate.
    let dir = tempfile::tempdir().unwrap();
    let errors = tls_failure(
        dir.path(),
        &up,
        &format!("ca_file = \"{other_ca}\""),
        "unknown_ca",
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("unknown CA") && errors[0].contains(&other_ca),
        "the ERROR names the CA file: {}",
        errors[0]
    );
    drop(up);

    // A certificate for another name.
    let up = tls_broker(&pki, "elsewhere", false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let errors = tls_failure(
        dir.path(),
        &up,
        &format!("ca_file = \"{ca}\""),
        "name_mismatch",
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("name mismatch") && errors[0].contains("127.0.0.1"),
        "{}",
        errors[0]
    );
    drop(up);

    // An expired certificate.
    if faketime {
        let up = tls_broker(&pki, "expired", false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let errors = tls_failure(dir.path(), &up, &format!("ca_file = \"{ca}\""), "expired");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("expired"), "{}", errors[0]);
        drop(up);
    }

    // A client certificate the broker does not accept.
    let up = tls_broker(&pki, "server", true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let errors = tls_failure(
        dir.path(),
        &up,
        &format!(
            "ca_file = \"{ca}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
            pki.path("client.pem"),
            pki.path("client.key")
        ),
        "client_cert_refused",
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("client certificate refused") && errors[0].contains("client.pem"),
        "{}",
        errors[0]
    );
}
