//! The command line as an operator uses it: `check` and `run` on good and bad inputs.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

use common::free_port;

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
