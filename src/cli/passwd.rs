//! `edgeferry passwd FILE USER [-D] [--password-stdin]`: edit a Mosquitto password file.
//!
//! Lines are written as `mosquitto_passwd` 2.x writes them (`$7$`, PBKDF2-SHA512, 101
//! iterations, 12-byte salt), so Mosquitto reads the file too. Other users' lines, including
//! `$6$` ones, are kept as they are. The file is replaced atomically (temporary file, fsync,
//! rename); a new file gets mode 600, an existing one keeps its mode.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use crate::ingest::auth::{Hash, PasswordFile};

/// Run the command; Err is the one-line message for standard error.
pub fn run(file: &Path, user: &str, delete: bool, password_stdin: bool) -> Result<(), String> {
    if user.is_empty() || user.contains(':') || user.contains(char::is_control) {
        return Err(format!(
            "user name {user:?} must be non-empty, without ':' or control characters"
        ));
    }
    let existing = file.exists();
    let mut f = if existing {
        PasswordFile::load(file).map_err(|e| e.to_string())?
    } else {
        PasswordFile::default()
    };
    if delete {
        if !f.remove(user) {
            return Err(format!("{}: no user {user:?}", file.display()));
        }
    } else {
        let password = read_password(password_stdin)?;
        if password.is_empty() {
            return Err("empty password".into());
        }
        let hash = Hash::new_pbkdf2(password.as_bytes()).map_err(|e| e.to_string())?;
        f.set(user, hash);
    }
    write_atomically(file, f.to_text().as_bytes(), existing)
        .map_err(|e| format!("{}: cannot write: {e}", file.display()))
}

fn read_password(from_stdin: bool) -> Result<String, String> {
    let stdin = std::io::stdin();
    if from_stdin || !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("reading the password: {e}"))?;
        return Ok(line.trim_end_matches(['\n', '\r']).to_string());
    }
    // Prompt without echo: stty is everywhere a terminal is, and needs no unsafe code here.
    let first = prompt("Password: ")?;
    let second = prompt("Reenter password: ")?;
    if first != second {
        return Err("passwords do not match".into());
    }
    Ok(first)
}

fn prompt(text: &str) -> Result<String, String> {
    eprint!("{text}");
    let _ = std::io::stderr().flush();
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(std::process::Stdio::inherit())
            .status()
    };
    let _ = stty("-echo");
    let mut line = String::new();
    let r = std::io::stdin().lock().read_line(&mut line);
    let _ = stty("echo");
    eprintln!();
    r.map_err(|e| format!("reading the password: {e}"))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

fn write_atomically(path: &Path, bytes: &[u8], existing: bool) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let mode = if existing {
        std::fs::metadata(path)?.permissions().mode() & 0o7777
    } else {
        0o600
    };
    let result = (|| {
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        out.set_permissions(std::fs::Permissions::from_mode(mode))?;
        out.write_all(bytes)?;
        out.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
