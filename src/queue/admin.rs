//! `edgeferry queue`: reading and changing the store beside a running daemon.
//!
//! The daemon keeps its connection; this one reads through WAL (readers never block the daemon,
//! nor it them) and writes in short `BEGIN IMMEDIATE` transactions of at most [`CHUNK`] rows,
//! waiting up to `busy_timeout` for the daemon's commit to end. It keeps the store's invariants:
//! it never allocates a seq (a replayed dead letter gets its original one back, which no other
//! row can hold), counters in `stats` change in the same transaction as the rows, and every row
//! it removes is counted (`drop.purged`). The daemon notices its commits through
//! `PRAGMA data_version`, reloads the counters and forwards replayed rows.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;

use super::ledger::{self, Delta, Ledger};
use super::{now_ms, schema, StoreError, DROP_PURGED, DROP_REASONS};

/// Rows changed per transaction, so the daemon never waits long for the write lock.
const CHUNK: usize = 1000;

/// An open store, for inspection and operator changes.
pub struct Admin {
    conn: Connection,
    path: PathBuf,
}

/// One route's line in `stats`.
#[derive(Debug, Clone, Serialize)]
pub struct RouteStats {
    pub route: String,
    pub depth: i64,
    pub bytes: i64,
    /// Receive time of the oldest queued message (ms since the epoch).
    pub oldest_ms: Option<i64>,
    /// Dead letters now held, by reason.
    pub dead_letters: std::collections::BTreeMap<String, i64>,
    /// Messages dropped so far, by reason.
    pub dropped: std::collections::BTreeMap<String, i64>,
    /// Receive times of the oldest and newest message ever dropped.
    pub dropped_first_ms: Option<i64>,
    pub dropped_last_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueStats {
    pub path: String,
    pub epoch: String,
    pub now_ms: i64,
    pub file_bytes: u64,
    pub routes: Vec<RouteStats>,
}

/// A queued message or dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub seq: i64,
    pub route: String,
    pub topic: String,
    pub enqueued_ms: i64,
    pub size: i64,
    #[serde(skip)]
    pub payload: Vec<u8>,
    /// Dead letters only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead: Option<DeadInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadInfo {
    pub reason: String,
    pub detail: String,
    pub failed_ms: i64,
    pub first_attempt_ms: Option<i64>,
    pub last_attempt_ms: Option<i64>,
}

/// Which dead letters an operation applies to.
#[derive(Debug, Clone)]
pub enum Select {
    Seqs(Vec<i64>),
    Route(String),
    All,
}

impl Admin {
    /// Open for reading (`write = false`) or for replay and purge.
    pub fn open(path: &Path, write: bool) -> Result<Admin, StoreError> {
        let conn = schema::open_admin(path, write)?;
        Ok(Admin {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, e: rusqlite::Error) -> StoreError {
        schema::classify(&self.path, e)
    }

    fn route_id(&self, ledger: &Ledger, name: &str) -> Result<i64, StoreError> {
        ledger
            .route_id(name)
            .ok_or_else(|| StoreError::NoSuchRoute {
                path: self.path.clone(),
                route: name.to_string(),
            })
    }

    /// Per-route counters, from `stats` and one indexed read per route: no row is counted.
    pub fn stats(&self) -> Result<QueueStats, StoreError> {
        let ledger = Ledger::load(&self.conn).map_err(|e| self.err(e))?;
        let epoch: String = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })
            .map_err(|e| self.err(e))?;
        let mut routes = Vec::new();
        for (id, name) in ledger.routes() {
            let depth = ledger.get(id, ledger::DEPTH);
            let oldest = if depth > 0 {
                self.conn
                    .query_row(
                        "SELECT enqueued_ms FROM messages WHERE route = ?1 ORDER BY seq LIMIT 1",
                        [id],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(|e| self.err(e))?
            } else {
                None
            };
            let mut dead = std::collections::BTreeMap::new();
            let mut dropped: std::collections::BTreeMap<String, i64> =
                DROP_REASONS.iter().map(|r| (r.to_string(), 0)).collect();
            for (r, n, v) in ledger.iter() {
                if r != id {
                    continue;
                }
                if let Some(reason) = n.strip_prefix("dead.") {
                    if v != 0 {
                        dead.insert(reason.to_string(), v);
                    }
                } else if let Some(reason) = n.strip_prefix("drop.") {
                    dropped.insert(reason.to_string(), v);
                }
            }
            let drops = dropped.values().sum::<i64>();
            if id == 0 && depth == 0 && dead.is_empty() && drops == 0 {
                // The placeholder for rows from before schema 3, which every store has (the
                // migrations run from the start on a new file): shown only when it holds
                // something.
                continue;
            }
            routes.push(RouteStats {
                route: name.to_string(),
                depth,
                bytes: ledger.get(id, ledger::BYTES),
                oldest_ms: oldest,
                dead_letters: dead,
                dropped,
                dropped_first_ms: (drops > 0).then(|| ledger.get(id, ledger::DROP_FIRST_MS)),
                dropped_last_ms: (drops > 0).then(|| ledger.get(id, ledger::DROP_LAST_MS)),
            });
        }
        let file_bytes = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
            + std::fs::metadata(super::wal_path(&self.path))
                .map(|m| m.len())
                .unwrap_or(0);
        Ok(QueueStats {
            path: self.path.display().to_string(),
            epoch,
            now_ms: now_ms(),
            file_bytes,
            routes,
        })
    }

    /// The oldest `limit` queued messages (of one route), or dead letters with `dead`; passed to
    /// `each` one at a time, so an export of any size holds one row in memory.
    pub fn scan(
        &self,
        route: Option<&str>,
        dead: bool,
        limit: Option<usize>,
        mut each: impl FnMut(Message) -> std::io::Result<()>,
    ) -> Result<(), StoreError> {
        let ledger = Ledger::load(&self.conn).map_err(|e| self.err(e))?;
        let route_id = route.map(|r| self.route_id(&ledger, r)).transpose()?;
        let limit = limit.map_or(-1, |l| l as i64);
        let sql = if dead {
            "SELECT seq, route, topic, enqueued_ms, size, payload, reason, detail, failed_ms,
                    first_attempt_ms, last_attempt_ms
             FROM dead_letters WHERE ?1 IS NULL OR route = ?1 ORDER BY seq LIMIT ?2"
        } else {
            "SELECT seq, route, topic, enqueued_ms, size, payload FROM messages
             WHERE ?1 IS NULL OR route = ?1 ORDER BY seq LIMIT ?2"
        };
        let mut st = self.conn.prepare(sql).map_err(|e| self.err(e))?;
        let mut rows = st
            .query(params![route_id, limit])
            .map_err(|e| self.err(e))?;
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            let m = (|| -> rusqlite::Result<Message> {
                let route: i64 = r.get(1)?;
                let topic = match r.get_ref(2)? {
                    rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                        String::from_utf8_lossy(t).into_owned()
                    }
                    _ => String::new(),
                };
                let payload = match r.get_ref(5)? {
                    rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                        t.to_vec()
                    }
                    _ => Vec::new(),
                };
                Ok(Message {
                    seq: r.get(0)?,
                    route: ledger
                        .route_name(route)
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| route.to_string()),
                    topic,
                    enqueued_ms: r.get(3)?,
                    size: r.get(4)?,
                    payload,
                    dead: if dead {
                        Some(DeadInfo {
                            reason: r.get(6)?,
                            detail: r.get(7)?,
                            failed_ms: r.get(8)?,
                            first_attempt_ms: r.get(9)?,
                            last_attempt_ms: r.get(10)?,
                        })
                    } else {
                        None
                    },
                })
            })()
            .map_err(|e| self.err(e))?;
            each(m).map_err(|e| StoreError::Open {
                path: self.path.clone(),
                detail: format!("cannot write the output: {e}"),
            })?;
        }
        Ok(())
    }

    /// One dead letter.
    pub fn dead_letter(&self, seq: i64) -> Result<Option<Message>, StoreError> {
        let mut found = None;
        let ledger = Ledger::load(&self.conn).map_err(|e| self.err(e))?;
        let row = self
            .conn
            .query_row(
                "SELECT route FROM dead_letters WHERE seq = ?1",
                [seq],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some(route) = row else { return Ok(None) };
        let name = ledger.route_name(route).map(|n| n.to_string());
        self.scan(name.as_deref(), true, None, |m| {
            if m.seq == seq {
                found = Some(m);
            }
            Ok(())
        })?;
        Ok(found)
    }

    fn dead_seqs(&self, sel: &Select) -> Result<Vec<i64>, StoreError> {
        let ledger = Ledger::load(&self.conn).map_err(|e| self.err(e))?;
        let route = match sel {
            Select::Seqs(s) => return Ok(s.clone()),
            Select::Route(r) => Some(self.route_id(&ledger, r)?),
            Select::All => None,
        };
        let mut st = self
            .conn
            .prepare("SELECT seq FROM dead_letters WHERE ?1 IS NULL OR route = ?1 ORDER BY seq")
            .map_err(|e| self.err(e))?;
        let seqs = st
            .query_map([route], |r| r.get(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<i64>>>())
            .map_err(|e| self.err(e));
        seqs
    }

    /// Put dead letters back in the queue under their original seqs (so their message ids are
    /// the ones the upstream may already know), received now (a ttl counts from the replay).
    /// Returns how many were replayed; `progress` is told after each transaction.
    pub fn replay(
        &mut self,
        sel: &Select,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<u64, StoreError> {
        let now = now_ms();
        self.each_dead_letter(sel, &mut progress, |tx, seq, d| {
            let row: Option<(i64, i64, String)> = tx
                .query_row(
                    "SELECT route, size, reason FROM dead_letters WHERE seq = ?1",
                    [seq],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let Some((route, size, reason)) = row else {
                return Ok(false);
            };
            tx.execute(
                "INSERT OR IGNORE INTO messages (seq, route, enqueued_ms, expires_ms, size, topic, payload)
                 SELECT seq, route, ?2, NULL, size, topic, payload FROM dead_letters WHERE seq = ?1",
                params![seq, now],
            )?;
            tx.execute("DELETE FROM dead_letters WHERE seq = ?1", [seq])?;
            tx.execute("INSERT OR IGNORE INTO replayed (seq) VALUES (?1)", [seq])?;
            d.add(route, &ledger::dead_stat(&reason), -1);
            d.add(route, ledger::DEPTH, 1);
            d.add(route, ledger::BYTES, size);
            Ok(true)
        })
    }

    /// Delete dead letters (counted as `drop.purged`).
    pub fn purge_dead(
        &mut self,
        sel: &Select,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<u64, StoreError> {
        self.each_dead_letter(sel, &mut progress, |tx, seq, d| {
            let gone: Option<(i64, String)> = tx
                .query_row(
                    "DELETE FROM dead_letters WHERE seq = ?1 RETURNING route, reason",
                    [seq],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((route, reason)) = gone else {
                return Ok(false);
            };
            d.add(route, &ledger::dead_stat(&reason), -1);
            d.add(route, &ledger::drop_stat(DROP_PURGED), 1);
            Ok(true)
        })
    }

    /// Apply `one` to each selected dead letter, [`CHUNK`] per short write transaction with its
    /// counter changes; `one` says whether the row was still there. `progress` is told after
    /// each transaction. Returns how many were acted on.
    fn each_dead_letter(
        &mut self,
        sel: &Select,
        progress: &mut impl FnMut(u64, u64),
        one: impl Fn(&rusqlite::Transaction<'_>, i64, &mut Delta) -> rusqlite::Result<bool>,
    ) -> Result<u64, StoreError> {
        let seqs = self.dead_seqs(sel)?;
        let total = seqs.len() as u64;
        let mut done = 0u64;
        for chunk in seqs.chunks(CHUNK) {
            let n = self
                .write(|tx| {
                    let mut d = Delta::default();
                    let mut n = 0u64;
                    for &seq in chunk {
                        if one(tx, seq, &mut d)? {
                            n += 1;
                        }
                    }
                    d.write(tx)?;
                    Ok(n)
                })
                .map_err(|e| self.err(e))?;
            done += n;
            progress(done, total);
        }
        Ok(done)
    }

    /// How many queued messages of `route` were received more than `older_than` ago.
    pub fn count_older(&self, route: &str, older_than: Duration) -> Result<u64, StoreError> {
        let ledger = Ledger::load(&self.conn).map_err(|e| self.err(e))?;
        let id = self.route_id(&ledger, route)?;
        let horizon = now_ms() - older_than.as_millis() as i64;
        self.conn
            .query_row(
                "SELECT count(*) FROM messages WHERE route = ?1 AND enqueued_ms < ?2",
                params![id, horizon],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    /// Delete `route`'s queued messages received more than `older_than` ago, oldest first, a
    /// chunk per transaction; counted as `drop.purged`.
    pub fn purge(
        &mut self,
        route: &str,
        older_than: Duration,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<u64, StoreError> {
        let total = self.count_older(route, older_than)?;
        let ledger = Ledger::load(&self.conn).map_err(|e| self.err(e))?;
        let id = self.route_id(&ledger, route)?;
        let horizon = now_ms() - older_than.as_millis() as i64;
        let mut done = 0u64;
        loop {
            let n = self
                .write(|tx| {
                    let victims: Vec<(i64, i64, i64)> = tx
                        .prepare(
                            "SELECT seq, size, enqueued_ms FROM messages
                             WHERE route = ?1 AND enqueued_ms < ?2 ORDER BY seq LIMIT ?3",
                        )?
                        .query_map(params![id, horizon, CHUNK as i64], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                        })?
                        .collect::<rusqlite::Result<_>>()?;
                    let mut d = Delta::default();
                    for (seq, size, enq) in &victims {
                        tx.execute("DELETE FROM messages WHERE seq = ?1", [seq])?;
                        d.dropped(id, DROP_PURGED, *size, *enq);
                    }
                    d.write(tx)?;
                    Ok(victims.len() as u64)
                })
                .map_err(|e| self.err(e))?;
            if n == 0 {
                break;
            }
            done += n;
            progress(done, total.max(done));
        }
        Ok(done)
    }

    /// One short IMMEDIATE transaction: takes the write lock at once (waiting for the daemon's
    /// commit, up to busy_timeout) so it can never deadlock on an upgrade from a read.
    fn write<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}
