//! `edgeferry queue`: stats, peek, export, dead letters (list, show, replay, purge) and purge,
//! against the live store (see `queue::admin` for how it shares the file with the daemon).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use clap::Subcommand;
use serde::Serialize;

use crate::config::units::parse_duration;
use crate::queue::admin::{Admin, Message, Select};
use crate::queue::StoreError;

#[derive(Debug, Subcommand)]
pub enum QueueOp {
    /// Per route: depth, bytes, oldest age, dead letters and drops by reason.
    Stats,
    /// The oldest queued messages: id, topic, age, size, payload preview.
    Peek {
        /// Only this route (its `name`, else its `from` filter; serial ports are "serial/NAME").
        #[arg(long)]
        route: Option<String>,
        #[arg(long, default_value_t = 10)]
        limit: usize,
    },
    /// Every queued message (or dead letter) as JSON lines; payloads base64 when not UTF-8.
    Export {
        #[arg(long)]
        route: Option<String>,
        /// Export the dead letters instead of the queue.
        #[arg(long)]
        dead: bool,
        /// Write here instead of standard output.
        #[arg(long, short)]
        output: Option<std::path::PathBuf>,
    },
    /// The dead letters.
    #[command(name = "dead-letters", subcommand)]
    DeadLetters(DeadOp),
    /// Delete a route's queued messages older than a duration (counted as purged).
    Purge {
        #[arg(long)]
        route: String,
        /// e.g. "2d", "12h".
        #[arg(long, value_parser = duration_arg)]
        older_than: Duration,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadOp {
    /// Dead letters, oldest first.
    List {
        #[arg(long)]
        route: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One dead letter, with its payload.
    Show { seq: i64 },
    /// Put dead letters back in the queue under their original ids.
    Replay {
        /// Sequence numbers (the last part of the message id).
        seqs: Vec<i64>,
        #[arg(long, conflicts_with = "seqs")]
        route: Option<String>,
        #[arg(long, conflicts_with_all = ["seqs", "route"])]
        all: bool,
    },
    /// Delete dead letters (counted as purged).
    Purge {
        seqs: Vec<i64>,
        #[arg(long, conflicts_with = "seqs")]
        route: Option<String>,
        #[arg(long, conflicts_with_all = ["seqs", "route"])]
        all: bool,
        #[arg(long)]
        yes: bool,
    },
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

/// Why a queue command failed, with the exit status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum QueueCliError {
    /// An argument the store cannot act on.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The operator said no at the confirmation prompt.
    #[error("aborted; nothing was changed")]
    Aborted,
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

impl QueueCliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            QueueCliError::Usage(_) | QueueCliError::Store(StoreError::NoSuchRoute { .. }) => {
                super::EXIT_USAGE
            }
            QueueCliError::Store(StoreError::Missing { .. }) => super::EXIT_NOINPUT,
            QueueCliError::Store(
                StoreError::NotADatabase { .. }
                | StoreError::Foreign { .. }
                | StoreError::TooNew { .. }
                | StoreError::TooOld { .. }
                | StoreError::Corrupt { .. },
            ) => super::EXIT_CONFIG,
            _ => super::EXIT_FAILURE,
        }
    }
}

fn selection(seqs: Vec<i64>, route: Option<String>, all: bool) -> Result<Select, QueueCliError> {
    match (seqs.is_empty(), route, all) {
        (false, None, false) => Ok(Select::Seqs(seqs)),
        (true, Some(r), false) => Ok(Select::Route(r)),
        (true, None, true) => Ok(Select::All),
        _ => Err(QueueCliError::Usage(
            "name the dead letters: sequence numbers, --route ROUTE, or --all".into(),
        )),
    }
}

/// Ask on a terminal; refuse without one (a script must say --yes).
fn confirm(question: &str) -> Result<(), QueueCliError> {
    if !std::io::stdin().is_terminal() {
        return Err(QueueCliError::Usage(format!(
            "{question}: not confirmed (no terminal); add --yes"
        )));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    if matches!(line.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(QueueCliError::Aborted)
    }
}

/// A progress line on a terminal (standard error), nothing otherwise.
fn progress() -> impl FnMut(u64, u64) {
    let tty = std::io::stderr().is_terminal();
    move |done, total| {
        if tty {
            eprint!("\r{done}/{total}");
            if done >= total {
                eprintln!();
            }
        }
    }
}

fn age(now: i64, then: i64) -> String {
    let s = (now - then).max(0) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn preview(payload: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(&payload[..payload.len().min(48)])
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    if payload.len() > 48 {
        format!("{text}...")
    } else {
        text
    }
}

/// A message as one JSON line: payload as text when it is UTF-8, else base64.
#[derive(Serialize)]
struct Line<'a> {
    #[serde(flatten)]
    message: &'a Message,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
}

fn json_line(m: &Message) -> String {
    let (payload, payload_base64) = match std::str::from_utf8(&m.payload) {
        Ok(t) => (Some(t.to_string()), None),
        Err(_) => (None, Some(base64(&m.payload))),
    };
    serde_json::to_string(&Line {
        message: m,
        payload,
        payload_base64,
    })
    .unwrap_or_default()
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Run one `edgeferry queue` command against the store at `store`.
pub fn run(store: &Path, json: bool, op: QueueOp) -> Result<(), QueueCliError> {
    let mut out = std::io::stdout().lock();
    let now = crate::queue::now_ms();
    match op {
        QueueOp::Stats => {
            let s = Admin::open(store, false)?.stats()?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&s).unwrap_or_default())?;
                return Ok(());
            }
            writeln!(
                out,
                "{:<28} {:>9} {:>12} {:>8} {:>6} {:>8}  DROPPED",
                "ROUTE", "DEPTH", "BYTES", "OLDEST", "DEAD", "DROPS"
            )?;
            for r in &s.routes {
                let dead: i64 = r.dead_letters.values().sum();
                let drops: i64 = r.dropped.values().sum();
                let detail = r
                    .dropped
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(k, n)| format!("{k}={n}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                let range = match (r.dropped_first_ms, r.dropped_last_ms) {
                    (Some(a), Some(b)) => {
                        format!(" (received {} to {} ago)", age(now, a), age(now, b))
                    }
                    _ => String::new(),
                };
                writeln!(
                    out,
                    "{:<28} {:>9} {:>12} {:>8} {:>6} {:>8}  {detail}{range}",
                    r.route,
                    r.depth,
                    r.bytes,
                    r.oldest_ms.map_or("-".into(), |o| age(now, o)),
                    dead,
                    drops
                )?;
            }
            writeln!(out, "file {} bytes, {}", s.file_bytes, s.path)?;
        }
        QueueOp::Peek { route, limit } => {
            let admin = Admin::open(store, false)?;
            if !json {
                writeln!(
                    out,
                    "{:>10} {:<24} {:<32} {:>6} {:>7}  PAYLOAD",
                    "SEQ", "ROUTE", "TOPIC", "AGE", "SIZE"
                )?;
            }
            admin.scan(route.as_deref(), false, Some(limit), |m| {
                if json {
                    writeln!(out, "{}", json_line(&m))
                } else {
                    writeln!(
                        out,
                        "{:>10} {:<24} {:<32} {:>6} {:>7}  {}",
                        m.seq,
                        m.route,
                        m.topic,
                        age(now, m.enqueued_ms),
                        m.size,
                        preview(&m.payload)
                    )
                }
            })?;
        }
        QueueOp::Export {
            route,
            dead,
            output,
        } => {
            let admin = Admin::open(store, false)?;
            let mut file: Box<dyn Write> = match &output {
                Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p)?)),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            drop(out);
            admin.scan(route.as_deref(), dead, None, |m| {
                writeln!(file, "{}", json_line(&m))
            })?;
            file.flush()?;
            return Ok(());
        }
        QueueOp::DeadLetters(DeadOp::List { route, limit }) => {
            let admin = Admin::open(store, false)?;
            if !json {
                writeln!(
                    out,
                    "{:>10} {:<24} {:<12} {:>6} {:<32}  DETAIL",
                    "SEQ", "ROUTE", "REASON", "AGE", "TOPIC"
                )?;
            }
            admin.scan(route.as_deref(), true, Some(limit), |m| {
                if json {
                    return writeln!(out, "{}", json_line(&m));
                }
                let (reason, detail, failed) = m
                    .dead
                    .as_ref()
                    .map(|d| (d.reason.as_str(), d.detail.as_str(), d.failed_ms))
                    .unwrap_or(("", "", now));
                writeln!(
                    out,
                    "{:>10} {:<24} {:<12} {:>6} {:<32}  {detail}",
                    m.seq,
                    m.route,
                    reason,
                    age(now, failed),
                    m.topic
                )
            })?;
        }
        QueueOp::DeadLetters(DeadOp::Show { seq }) => {
            let admin = Admin::open(store, false)?;
            let Some(m) = admin.dead_letter(seq)? else {
                return Err(QueueCliError::Usage(format!(
                    "no dead letter with seq {seq}"
                )));
            };
            if json {
                writeln!(out, "{}", json_line(&m))?;
            } else {
                let d = m.dead.as_ref();
                writeln!(out, "seq        {}", m.seq)?;
                writeln!(out, "route      {}", m.route)?;
                writeln!(out, "topic      {}", m.topic)?;
                writeln!(out, "received   {} ago", age(now, m.enqueued_ms))?;
                if let Some(d) = d {
                    writeln!(out, "reason     {} {}", d.reason, d.detail)?;
                    writeln!(out, "failed     {} ago", age(now, d.failed_ms))?;
                    if let (Some(f), Some(l)) = (d.first_attempt_ms, d.last_attempt_ms) {
                        writeln!(
                            out,
                            "attempts   first {} ago, last {} ago",
                            age(now, f),
                            age(now, l)
                        )?;
                    }
                }
                writeln!(out, "size       {}", m.size)?;
                match std::str::from_utf8(&m.payload) {
                    Ok(t) => writeln!(out, "payload    {t}")?,
                    Err(_) => writeln!(out, "payload    (base64) {}", base64(&m.payload))?,
                }
            }
        }
        QueueOp::DeadLetters(DeadOp::Replay { seqs, route, all }) => {
            let sel = selection(seqs, route, all)?;
            let n = Admin::open(store, true)?.replay(&sel, progress())?;
            report(&mut out, json, "replayed", n)?;
        }
        QueueOp::DeadLetters(DeadOp::Purge {
            seqs,
            route,
            all,
            yes,
        }) => {
            let sel = selection(seqs, route, all)?;
            if !yes {
                confirm("delete these dead letters for good?")?;
            }
            let n = Admin::open(store, true)?.purge_dead(&sel, progress())?;
            report(&mut out, json, "purged", n)?;
        }
        QueueOp::Purge {
            route,
            older_than,
            yes,
        } => {
            let mut admin = Admin::open(store, true)?;
            if !yes {
                let n = admin.count_older(&route, older_than)?;
                confirm(&format!(
                    "delete {n} queued messages of route {route:?} received more than {older_than:?} ago? They will never be delivered"
                ))?;
            }
            let n = admin.purge(&route, older_than, progress())?;
            report(&mut out, json, "purged", n)?;
        }
    }
    Ok(())
}

fn report(out: &mut impl Write, json: bool, what: &str, n: u64) -> std::io::Result<()> {
    if json {
        writeln!(out, "{{\"{what}\":{n}}}")
    } else {
        writeln!(out, "{what} {n}")
    }
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }
}
