//! Local security end to end: the real daemon, raw-socket devices and Debian's Mosquitto tools
//! on loopback, real password and ACL files. Every refusal path is a real client being refused
//! with the code Mosquitto would use, counted, and nothing it was refused reaching the queue.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::raw::{publish_frame, Got, RawDevice};
use common::*;

const SHORT: Duration = Duration::from_secs(10);

fn varint(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A CONNECT with optional user name and password (clean session, keepalive 60 s).
fn connect_frame(client_id: &str, v5: bool, user: Option<&str>, pass: Option<&str>) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.push(if v5 { 5 } else { 4 });
    let mut flags = 0x02;
    if user.is_some() {
        flags |= 0x80;
    }
    if pass.is_some() {
        flags |= 0x40;
    }
    body.push(flags);
    body.extend_from_slice(&60u16.to_be_bytes());
    if v5 {
        body.push(0);
    }
    string(&mut body, client_id.as_bytes());
    if let Some(u) = user {
        string(&mut body, u.as_bytes());
    }
    if let Some(p) = pass {
        string(&mut body, p.as_bytes());
    }
    let mut f = vec![0x10];
    varint(&mut f, body.len());
    f.extend_from_slice(&body);
    f
}

/// Connect; returns the device and the CONNACK's return/reason code.
fn connect(
    port: u16,
    client: &str,
    v5: bool,
    user: Option<&str>,
    pass: Option<&str>,
) -> (RawDevice, u8) {
    let mut d = RawDevice::open(port);
    d.v5 = v5;
    d.send(&connect_frame(client, v5, user, pass));
    match d.read(SHORT) {
        Got::Packet(p) => {
            assert_eq!(p[0], 0x20, "expected CONNACK, got {p:02x?}");
            (d, p[3])
        }
        other => panic!("no CONNACK for {client}: {other:?}"),
    }
}

/// A v5 acknowledgement's reason code (omitted when it is success).
fn reason(p: &[u8]) -> u8 {
    p.get(4).copied().unwrap_or(0)
}

fn subscribe_frame(pkid: u16, filters: &[&str], v5: bool) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v5 {
        body.push(0);
    }
    for f in filters {
        string(&mut body, f.as_bytes());
        body.push(1);
    }
    let mut out = vec![0x82];
    varint(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// The SUBACK's codes (after pkid and, for v5, the property block).
fn suback_codes(p: &[u8], v5: bool) -> Vec<u8> {
    assert_eq!(p[0], 0x90, "expected SUBACK, got {p:02x?}");
    let mut i = 4;
    if v5 {
        i += 1 + p[4] as usize;
    }
    p[i..].to_vec()
}

fn mosquitto_passwd(file: &Path, user: &str, pass: &str) {
    let mut cmd = Command::new("mosquitto_passwd");
    if !file.exists() {
        cmd.arg("-c");
    }
    let ok = cmd
        .arg("-b")
        .arg(file)
        .args([user, pass])
        .stderr(Stdio::null())
        .status()
        .expect("mosquitto_passwd")
        .success();
    assert!(ok, "mosquitto_passwd failed");
}

fn edgeferry_passwd(file: &Path, args: &[&str], stdin: &str) -> bool {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .arg("passwd")
        .arg(file)
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait().unwrap().success()
}

/// Mosquitto started as root switches to its own user, which cannot read a test's 600 file.
fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A daemon whose upstream is down, so what it queued stays in the store to be read.
fn daemon(dir: &Path, local_extra: String) -> Daemon {
    let mut cfg = DaemonConfig::new("v5", free_port());
    cfg.local_extra = local_extra;
    cfg.routes =
        "[[route]]\nfrom = \"devices/#\"\nto = \"up/{topic}\"\ndedup = \"json:/id\"\n".into();
    Daemon::start(dir, &cfg)
}

fn refused(d: &Daemon, reason: &str) -> u64 {
    scrape(d.metrics)
        .and_then(|m| {
            m.get(&format!(
                "edgeferry_security_refused_total{{reason=\"{reason}\"}}"
            ))
            .copied()
        })
        .unwrap_or(0)
}

/// A file made by Debian's mosquitto_passwd is read as is. Anonymous devices, unknown users and
/// wrong passwords get the return code for bad credentials from the ingress (v3.1.1 0x05/0x04,
/// v5 0x87/0x86), are counted, and logged at most once per client; the right password connects
/// and publishes.
#[test]
fn mosquitto_password_file_refuses_bad_credentials_with_mqtt_codes() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    mosquitto_passwd(&pw, "alice", "s3cret");
    mosquitto_passwd(&pw, "bob", "other");
    let d = daemon(
        dir.path(),
        format!(
            "password_file = \"{}\"\nallow_anonymous = false\n",
            pw.display()
        ),
    );
    for v5 in [false, true] {
        let port = if v5 { d.local_v5 } else { d.local };
        let (anon, bad) = if v5 { (0x87, 0x86) } else { (0x05, 0x04) };
        let (mut dev, code) = connect(port, "anon", v5, None, None);
        assert_eq!(code, anon, "anonymous, v5={v5}");
        assert!(dev.closed_within(SHORT));
        for _ in 0..3 {
            assert_eq!(
                connect(port, "wrong", v5, Some("alice"), Some("nope")).1,
                bad
            );
        }
        assert_eq!(
            connect(port, "ghost", v5, Some("mallory"), Some("s3cret")).1,
            bad
        );
        let (mut dev, code) = connect(port, "good", v5, Some("alice"), Some("s3cret"));
        assert_eq!(code, 0, "the right password connects, v5={v5}");
        dev.send(&publish_frame(
            b"devices/alice",
            br#"{"id":1}"#,
            1,
            1,
            v5,
            &[],
        ));
        assert!(matches!(dev.read(SHORT), Got::Packet(p) if p[0] == 0x40));
    }
    assert_eq!(refused(&d, "anonymous"), 2);
    assert_eq!(refused(&d, "bad-credentials"), 8);
    let log = d.log_text();
    // Three refusals of "wrong" on each listener within a minute: one line.
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("device refused by local security")
                && l.contains("client=\"wrong\""))
            .count(),
        1,
        "{log}"
    );
    assert!(
        !log.contains("s3cret") && !log.contains("nope"),
        "no password in logs"
    );
}

/// Files written by `edgeferry passwd` are accepted by Debian's mosquitto (and -D deletes).
#[test]
fn edgeferry_passwd_files_are_accepted_by_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    assert!(edgeferry_passwd(
        &pw,
        &["alice", "--password-stdin"],
        "s3cret\n"
    ));
    assert!(edgeferry_passwd(&pw, &["bob", "--password-stdin"], "b0b\n"));
    mosquitto_passwd(&pw, "carol", "c4rol"); // mosquitto_passwd edits our file too
    assert!(edgeferry_passwd(&pw, &["-D", "bob"], ""));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&pw).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let port = free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence false\nuser {}\n",
            pw.display(),
            current_user()
        ),
    )
    .unwrap();
    let mut broker = Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until_listening(port);
    let code = |user: &str, pass: &str| {
        connect(port, &format!("c-{user}"), false, Some(user), Some(pass)).1
    };
    let results = (
        code("alice", "s3cret"),
        code("carol", "c4rol"),
        code("alice", "wrong"),
        code("bob", "b0b"),
    );
    let _ = broker.kill();
    let _ = broker.wait();
    assert_eq!(results.0, 0, "mosquitto accepts edgeferry's $7$ line");
    assert_eq!(results.1, 0);
    assert_ne!(results.2, 0, "and refuses a wrong password");
    assert_ne!(results.3, 0, "-D deleted bob");
}

const ACL: &str = "\
# anonymous devices: read public topics only
topic read public/#
user alice
topic readwrite devices/alice/#
topic read devices/#
user bob
topic readwrite devices/bob/#
pattern write devices/%c/status
";

fn acl_daemon(dir: &Path) -> Daemon {
    let pw = dir.join("passwd");
    mosquitto_passwd(&pw, "alice", "a");
    mosquitto_passwd(&pw, "bob", "b");
    let acl = dir.join("acl");
    std::fs::write(&acl, ACL).unwrap();
    daemon(
        dir,
        format!(
            "password_file = \"{}\"\nacl_file = \"{}\"\nallow_anonymous = true\n",
            pw.display(),
            acl.display()
        ),
    )
}

/// A publish outside the device's write rights is never queued: v5 gets PUBACK 0x87, v3.1.1 a
/// plain PUBACK (Mosquitto's answer), both counted by client. Because dedup keys are scoped by
/// topic and alice may not write bob's topics, alice pre-publishing bob's predictable ids does
/// not suppress bob's real readings.
#[test]
fn acl_denied_publishes_are_never_queued_and_cannot_poison_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let d = acl_daemon(dir.path());
    let (mut alice5, c) = connect(d.local_v5, "alice-5", true, Some("alice"), Some("a"));
    assert_eq!(c, 0);
    let (mut alice4, c) = connect(d.local, "alice-4", false, Some("alice"), Some("a"));
    assert_eq!(c, 0);
    for i in 0..5u16 {
        let body = format!("{{\"id\":{i},\"forged\":true}}");
        alice5.send(&publish_frame(
            b"devices/bob/temp",
            body.as_bytes(),
            1,
            100 + i,
            true,
            &[],
        ));
        match alice5.read(SHORT) {
            Got::Packet(p) => assert_eq!((p[0], p[4]), (0x40, 0x87), "{p:02x?}"),
            other => panic!("{other:?}"),
        }
        alice4.send(&publish_frame(
            b"devices/bob/temp",
            body.as_bytes(),
            1,
            200 + i,
            false,
            &[],
        ));
        assert!(matches!(alice4.read(SHORT), Got::Packet(p) if p[0] == 0x40 && p.len() == 4));
    }
    // QoS 2 under v3.1.1: PUBREC, then PUBCOMP for the PUBREL; nothing queued.
    alice4.send(&publish_frame(
        b"devices/bob/temp",
        b"{\"id\":9}",
        2,
        300,
        false,
        &[],
    ));
    assert!(matches!(alice4.read(SHORT), Got::Packet(p) if p[0] == 0x50));
    alice4.send(&[0x62, 2, 1, 44]);
    assert!(matches!(alice4.read(SHORT), Got::Packet(p) if p[0] == 0x70));
    // Alice's own topic is fine, and the connection was never dropped.
    alice5.send(&publish_frame(
        b"devices/alice/t",
        b"{\"id\":1}",
        1,
        7,
        true,
        &[],
    ));
    assert!(matches!(alice5.read(SHORT), Got::Packet(p) if p[0] == 0x40 && reason(&p) == 0));
    let (mut bob, c) = connect(d.local, "bob-1", false, Some("bob"), Some("b"));
    assert_eq!(c, 0);
    for i in 0..5u16 {
        let body = format!("{{\"id\":{i},\"real\":true}}");
        bob.send(&publish_frame(
            b"devices/bob/temp",
            body.as_bytes(),
            1,
            1 + i,
            false,
            &[],
        ));
        assert!(matches!(bob.read(SHORT), Got::Packet(p) if p[0] == 0x40));
    }
    let queued = queued_payloads(&d.db_path());
    let text: Vec<String> = queued
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert!(
        text.iter()
            .all(|p| !p.contains("forged") && !p.contains("\"id\":9")),
        "{text:?}"
    );
    assert_eq!(
        text.iter().filter(|p| p.contains("real")).count(),
        5,
        "{text:?}"
    );
    assert_eq!(refused(&d, "acl-publish"), 11);
    let m = scrape(d.metrics).unwrap();
    assert_eq!(
        m.get("edgeferry_acl_denied_publishes_total{client=\"alice-5\"}"),
        Some(&5)
    );
    assert_eq!(
        m.get("edgeferry_acl_denied_publishes_total{client=\"alice-4\"}"),
        Some(&6)
    );
}

/// Subscriptions outside the read rights get a SUBACK failure code in their position (v3.1.1
/// 0x80, v5 0x87), whether the ingress answers alone or splices the codes into the broker's
/// SUBACK; granted filters in the same packet work.
#[test]
fn acl_denied_subscriptions_get_suback_failure_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = acl_daemon(dir.path());
    for v5 in [false, true] {
        let port = if v5 { d.local_v5 } else { d.local };
        let fail = if v5 { 0x87 } else { 0x80 };
        let (mut bob, c) = connect(port, "bob-sub", v5, Some("bob"), Some("b"));
        assert_eq!(c, 0);
        bob.send(&subscribe_frame(5, &["#", "devices/alice/#"], v5));
        match bob.read(SHORT) {
            Got::Packet(p) => assert_eq!(suback_codes(&p, v5), vec![fail, fail]),
            other => panic!("{other:?}"),
        }
        bob.send(&subscribe_frame(
            6,
            &["secret/#", "devices/bob/+", "public/x"],
            v5,
        ));
        match bob.read(SHORT) {
            Got::Packet(p) => assert_eq!(suback_codes(&p, v5), vec![fail, 1, fail]),
            other => panic!("{other:?}"),
        }
        // Anonymous devices get the rules above the first user line.
        let (mut anon, _) = connect(port, "anon-sub", v5, None, None);
        anon.send(&subscribe_frame(7, &["public/#", "devices/#"], v5));
        match anon.read(SHORT) {
            Got::Packet(p) => assert_eq!(suback_codes(&p, v5), vec![1, fail]),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(refused(&d, "acl-subscribe"), 10);
}

/// `pattern write devices/%c/status`: each device may write its own status topic only (a client
/// id holding a wildcard gets nothing from a pattern: see the unit tests in `ingest::acl`).
#[test]
fn acl_pattern_is_per_client_id() {
    let dir = tempfile::tempdir().unwrap();
    let d = acl_daemon(dir.path());
    let (mut dev, _) = connect(d.local_v5, "sensor-7", true, None, None);
    dev.send(&publish_frame(
        b"devices/sensor-7/status",
        b"{\"id\":1}",
        1,
        1,
        true,
        &[],
    ));
    assert!(matches!(dev.read(SHORT), Got::Packet(p) if reason(&p) == 0));
    dev.send(&publish_frame(
        b"devices/sensor-8/status",
        b"{\"id\":2}",
        1,
        2,
        true,
        &[],
    ));
    assert!(matches!(dev.read(SHORT), Got::Packet(p) if p[4] == 0x87));
    let queued = queued_payloads(&d.db_path());
    assert_eq!(queued, vec![b"{\"id\":1}".to_vec()]);
}

/// SIGHUP reloads the password and ACL files; a new file with a bad line keeps the old one in
/// force and logs an ERROR naming the line. A group/world-readable password file is warned about.
#[test]
fn sighup_reloads_files_and_keeps_the_old_one_when_the_new_is_invalid() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    mosquitto_passwd(&pw, "alice", "a");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "user alice\ntopic write devices/alice/#\n").unwrap();
    let d = daemon(
        dir.path(),
        format!(
            "password_file = \"{}\"\nacl_file = \"{}\"\nallow_anonymous = false\n",
            pw.display(),
            acl.display()
        ),
    );
    assert!(d.log_text().contains("readable by group or others"));
    assert_eq!(
        connect(d.local, "c", false, Some("carol"), Some("c")).1,
        0x04
    );
    let (mut alice, _) = connect(d.local_v5, "a1", true, Some("alice"), Some("a"));
    alice.send(&publish_frame(b"devices/other/x", b"1", 1, 1, true, &[]));
    assert!(matches!(alice.read(SHORT), Got::Packet(p) if reason(&p) == 0x87));

    let metric = |name: &str| {
        scrape(d.metrics)
            .and_then(|m| m.get(name).copied())
            .unwrap_or(0)
    };
    let hup = || {
        let pid = d.pid().unwrap().to_string();
        assert!(Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success());
    };
    mosquitto_passwd(&pw, "carol", "c");
    std::fs::write(&acl, "user alice\ntopic write devices/#\n").unwrap();
    hup();
    wait_for("reload", SHORT, || {
        (metric("edgeferry_security_reloads_total{result=\"ok\"}") == 1).then_some(())
    });
    assert_eq!(connect(d.local, "c", false, Some("carol"), Some("c")).1, 0);
    // The open connection uses the new ACL from its next packet.
    alice.send(&publish_frame(b"devices/other/x", b"2", 1, 2, true, &[]));
    assert!(matches!(alice.read(SHORT), Got::Packet(p) if reason(&p) == 0));

    std::fs::write(&pw, "alice:$7$101$broken\n").unwrap();
    std::fs::write(&acl, "user alice\ntopic write devices/#\nbogus line\n").unwrap();
    hup();
    wait_for("refused reload", SHORT, || {
        (metric("edgeferry_security_reloads_total{result=\"invalid\"}") == 1).then_some(())
    });
    let log = d.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("passwd:1:")),
        "{log}"
    );
    assert!(log
        .lines()
        .any(|l| l.contains("ERROR") && l.contains("acl:3:")));
    assert_eq!(
        connect(d.local, "c2", false, Some("carol"), Some("c")).1,
        0,
        "the previous password file stays in force"
    );
    alice.send(&publish_frame(b"devices/other/x", b"3", 1, 3, true, &[]));
    assert!(matches!(alice.read(SHORT), Got::Packet(p) if reason(&p) == 0));
    assert!(
        scrape(d.metrics).is_some(),
        "still running after two SIGHUPs"
    );
}

/// Memory a device could make the broker or the ingress hold, bounded at CI scale: long client
/// ids are refused (0x02 / v5 0x85), subscriptions beyond the cap and over-long filters get
/// failure codes, deep topics get PUBACK 0x90, unreleased QoS 2 publishes beyond the cap close
/// the connection; each counted, and a good device keeps flowing.
#[test]
fn per_device_memory_limits_refuse_and_count() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(
        dir.path(),
        "max_client_id_len = 16\nmax_subscriptions = 3\nmax_topic_levels = 4\nmax_qos2_inflight = 5\n"
            .into(),
    );
    let long = "x".repeat(17);
    assert_eq!(connect(d.local, &long, false, None, None).1, 0x02);
    assert_eq!(connect(d.local_v5, &long, true, None, None).1, 0x85);
    let (mut dev, _) = connect(d.local_v5, "subber", true, None, None);
    dev.send(&subscribe_frame(
        1,
        &["a/1", "a/2", "a/3", "a/4", "a/b/c/d/e"],
        true,
    ));
    match dev.read(SHORT) {
        Got::Packet(p) => assert_eq!(suback_codes(&p, true), vec![1, 1, 1, 0x97, 0x97]),
        other => panic!("{other:?}"),
    }
    dev.send(&publish_frame(b"devices/a/b/c/d", b"deep", 1, 2, true, &[]));
    assert!(matches!(dev.read(SHORT), Got::Packet(p) if reason(&p) == 0x90));
    let (mut q2, _) = connect(d.local_v5, "q2", true, None, None);
    for pkid in 1..=6u16 {
        q2.send(&publish_frame(
            b"devices/q2",
            b"{\"id\":0}",
            2,
            pkid,
            true,
            &[],
        ));
    }
    assert!(
        q2.closed_within(SHORT),
        "the 6th unreleased QoS 2 publish closes"
    );
    let (mut good, c) = connect(d.local_v5, "good", true, None, None);
    assert_eq!(c, 0);
    good.send(&publish_frame(
        b"devices/good",
        b"{\"id\":1}",
        1,
        1,
        true,
        &[],
    ));
    assert!(matches!(good.read(SHORT), Got::Packet(p) if reason(&p) == 0));
    assert_eq!(refused(&d, "client-id-length"), 2);
    assert_eq!(refused(&d, "subscriptions"), 1);
    assert_eq!(refused(&d, "topic-size"), 2);
    assert_eq!(refused(&d, "qos2-inflight"), 1);
}
