//! Opening the store file: identity checks, pragmas, schema creation and migrations.

use std::path::Path;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use super::StoreError;
use crate::config::SyncMode;

/// `PRAGMA application_id` of an edgeferry store: "EFRY".
pub const APPLICATION_ID: i64 = 0x4546_5259;

/// The schema this build writes. `MIGRATIONS[i]` takes a store from version i to i + 1.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

pub(super) const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the initial schema.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE messages (
         seq INTEGER PRIMARY KEY AUTOINCREMENT,
         topic TEXT NOT NULL,
         payload BLOB NOT NULL,
         enqueued_ms INTEGER NOT NULL
     );
     CREATE TABLE dedup (key BLOB PRIMARY KEY, seen_ms INTEGER NOT NULL) WITHOUT ROWID;
     CREATE INDEX dedup_by_age ON dedup (seen_ms);
     CREATE TABLE dead_letters (
         seq INTEGER PRIMARY KEY,
         topic TEXT NOT NULL,
         payload BLOB NOT NULL,
         enqueued_ms INTEGER NOT NULL,
         failed_ms INTEGER NOT NULL,
         reason TEXT NOT NULL
     );",
    // 1 -> 2: dedup keys remember the order they were admitted in (`ord`, the rowid), and
    // eviction beyond dedup.max_keys follows it instead of `seen_ms`: a wall clock that stepped
    // back would otherwise make fresh keys look older than stale ones. Existing keys keep the
    // order of their stamps, the best that is known about them.
    "CREATE TABLE dedup_v2 (
         ord INTEGER PRIMARY KEY,
         key BLOB NOT NULL UNIQUE,
         seen_ms INTEGER NOT NULL
     );
     INSERT INTO dedup_v2 (key, seen_ms) SELECT key, seen_ms FROM dedup ORDER BY seen_ms, key;
     DROP TABLE dedup;
     ALTER TABLE dedup_v2 RENAME TO dedup;
     CREATE INDEX dedup_by_age ON dedup (seen_ms);",
    // 2 -> 3: the operator's queue. See the invariants in `queue` for what each part is for.
    // - `messages` loses AUTOINCREMENT: its sqlite_sequence row was rewritten by every commit
    //   (one more page per commit on flash). Seqs are allocated in memory instead, above a
    //   high-water mark `meta.seq_reserved` that is advanced in blocks; it starts above every seq
    //   the old table handed out (its sqlite_sequence, live rows, dead letters).
    // - Each row names its route (`routes.id`) and keeps its size, so bounds, drops and stats are
    //   kept per route without reading payloads. Small fixed columns come first so reading them
    //   never touches a payload's overflow pages.
    // - `stats` keeps counters (depth, bytes, drops, dead letters by reason) per route, updated
    //   in the transaction that changes them: start-up and `edgeferry queue stats` read this
    //   small table instead of counting rows. Computed here once, the only full scan.
    // - Dead letters keep their route, first and last attempt, and the reason split into its
    //   kind (`refused`, `expired`, ...) and the upstream's detail string.
    // - `replayed` lists dead letters `edgeferry queue dead-letters replay` put back under their
    //   original seqs, below where the forwarder reads; the store thread picks them up.
    // Rows of the old table belong to route 0, "(before v3)".
    "CREATE TABLE routes (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
     INSERT INTO routes (id, name) VALUES (0, '(before v3)');
     CREATE TABLE messages_v3 (
         seq INTEGER PRIMARY KEY,
         route INTEGER NOT NULL,
         enqueued_ms INTEGER NOT NULL,
         expires_ms INTEGER,
         size INTEGER NOT NULL,
         topic TEXT NOT NULL,
         payload BLOB NOT NULL
     );
     INSERT INTO messages_v3 (seq, route, enqueued_ms, expires_ms, size, topic, payload)
         SELECT seq, 0, coalesce(enqueued_ms, 0), NULL,
                coalesce(length(CAST(topic AS BLOB)), 0) + coalesce(length(CAST(payload AS BLOB)), 0),
                topic, payload
         FROM messages;
     INSERT OR REPLACE INTO meta (key, value) SELECT 'seq_reserved', CAST(max(
         coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0),
         coalesce((SELECT max(seq) FROM messages), 0),
         coalesce((SELECT max(seq) FROM dead_letters), 0)) AS TEXT);
     DROP TABLE messages;
     ALTER TABLE messages_v3 RENAME TO messages;
     CREATE INDEX messages_by_route ON messages (route, seq);
     CREATE TABLE dead_v3 (
         seq INTEGER PRIMARY KEY,
         route INTEGER NOT NULL,
         enqueued_ms INTEGER NOT NULL,
         first_attempt_ms INTEGER,
         last_attempt_ms INTEGER,
         failed_ms INTEGER NOT NULL,
         size INTEGER NOT NULL,
         reason TEXT NOT NULL,
         detail TEXT NOT NULL,
         topic TEXT NOT NULL,
         payload BLOB NOT NULL
     );
     INSERT INTO dead_v3 (seq, route, enqueued_ms, first_attempt_ms, last_attempt_ms, failed_ms,
                          size, reason, detail, topic, payload)
         SELECT seq, 0, enqueued_ms, NULL, NULL, failed_ms,
                coalesce(length(CAST(topic AS BLOB)), 0) + coalesce(length(CAST(payload AS BLOB)), 0),
                CASE WHEN instr(reason, ':') > 0 THEN substr(reason, 1, instr(reason, ':') - 1)
                     ELSE reason END,
                CASE WHEN instr(reason, ':') > 0 THEN trim(substr(reason, instr(reason, ':') + 1))
                     ELSE '' END,
                topic, payload
         FROM dead_letters;
     DROP TABLE dead_letters;
     ALTER TABLE dead_v3 RENAME TO dead_letters;
     CREATE INDEX dead_letters_by_age ON dead_letters (failed_ms);
     CREATE TABLE stats (
         route INTEGER NOT NULL,
         name TEXT NOT NULL,
         value INTEGER NOT NULL,
         PRIMARY KEY (route, name)
     ) WITHOUT ROWID;
     INSERT INTO stats (route, name, value)
         SELECT route, 'depth', count(*) FROM messages GROUP BY route;
     INSERT INTO stats (route, name, value)
         SELECT route, 'bytes', sum(size) FROM messages GROUP BY route;
     INSERT INTO stats (route, name, value)
         SELECT route, 'dead.' || reason, count(*) FROM dead_letters GROUP BY route, reason;
     CREATE TABLE replayed (seq INTEGER PRIMARY KEY);",
];

/// Map an SQLite error to what the operator needs to know.
pub fn classify(path: &Path, e: rusqlite::Error) -> StoreError {
    let path = path.to_path_buf();
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => StoreError::NotADatabase { path },
        Some(ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            path,
            detail: e.to_string(),
        },
        Some(ErrorCode::CannotOpen)
        | Some(ErrorCode::PermissionDenied)
        | Some(ErrorCode::ReadOnly) => StoreError::Open {
            path,
            detail: e.to_string(),
        },
        _ => StoreError::Sqlite { path, source: e },
    }
}

/// Check an existing, non-empty file before anything opens it for writing: closing a
/// read-write connection checkpoints a WAL into the main file and deletes the WAL, so a file
/// that is going to be refused must only ever be opened read-only.
///
/// A file whose size is not a whole number of pages was truncated (SQLite would read the
/// missing tail as zeros and serve rows with garbage in them), and is refused as corrupt.
fn inspect(path: &Path) -> Result<(), StoreError> {
    use std::io::Read;
    let Ok(mut file) = std::fs::File::open(path) else {
        return Ok(()); // absent: created below (or the read-write open reports why not)
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len == 0 {
        return Ok(());
    }
    let mut header = [0u8; 100];
    if file.read_exact(&mut header).is_ok() && header.starts_with(b"SQLite format 3\0") {
        let page = match u16::from_be_bytes([header[16], header[17]]) {
            1 => 65536,
            n => u64::from(n),
        };
        if page >= 512 && len % page != 0 {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: format!(
                    "file size {len} is not a whole number of {page}-byte pages: it was truncated"
                ),
            });
        }
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| classify(path, e))?;
    identity(path, &conn).map(drop)
}

/// Refuse a foreign or newer store; otherwise whether the file is empty and new, and its schema
/// version. Reads only.
fn identity(path: &Path, conn: &Connection) -> Result<(bool, i64), StoreError> {
    let read = |sql: &str| -> Result<i64, StoreError> {
        conn.query_row(sql, [], |r| r.get(0))
            .map_err(|e| classify(path, e))
    };
    let app_id = read("PRAGMA application_id")?;
    let version = read("PRAGMA user_version")?;
    let tables = read("SELECT count(*) FROM sqlite_master")?;
    let fresh = app_id == 0 && version == 0 && tables == 0;
    if !fresh && app_id != APPLICATION_ID {
        return Err(StoreError::Foreign {
            path: path.to_path_buf(),
            app_id,
        });
    }
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known: SCHEMA_VERSION,
        });
    }
    Ok((fresh, version))
}

/// Create the store file, if absent, readable and writable by its owner only, whatever the
/// umask: the queue holds every device's payloads. SQLite gives the `-wal` and `-shm` files it
/// creates beside it the database file's permissions, so they are 0600 too. An existing file
/// keeps the mode its operator gave it.
fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        // Empty: SQLite initialises it as a new database.
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Open {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }),
    }
}

/// Open or create the store at `path`, refusing anything that is not ours.
pub fn open(path: &Path, sync: SyncMode) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(StoreError::Open {
                path: path.to_path_buf(),
                detail: format!("directory {} does not exist", dir.display()),
            });
        }
    }
    inspect(path)?;
    create_private(path)?;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| classify(path, e))?;
    let c = |e| classify(path, e);

    // Identity first, before any pragma that writes (journal_mode = WAL would modify a foreign
    // file's header). Checked again on this connection: the file may have been created or
    // replaced since `inspect`.
    let (fresh, version) = identity(path, &conn)?;
    if fresh {
        // 1 KiB pages: a commit writes whole pages to the WAL, and a typical commit (a few small
        // rows inserted, the acknowledged ones deleted, all at the table's tail) touches one
        // leaf page. With SQLite's default 4 KiB that is 4 KiB of flash per small commit; with
        // 1 KiB, a quarter. Set before anything is written; existing stores keep theirs.
        conn.execute_batch("PRAGMA page_size = 1024").map_err(c)?;
    }

    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(c)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Open {
            path: path.to_path_buf(),
            detail: format!("cannot switch to WAL mode (got {mode}); is the filesystem read-only or a network mount?"),
        });
    }
    let sync = match sync {
        SyncMode::Full => "FULL",
        SyncMode::Normal => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync};
         PRAGMA busy_timeout = 5000;
         PRAGMA journal_size_limit = 16777216;
         PRAGMA temp_store = FILE;
         PRAGMA cache_size = -2000;
         PRAGMA foreign_keys = OFF;"
    ))
    .map_err(c)?;

    if version < SCHEMA_VERSION {
        migrate(&conn, version, fresh).map_err(c)?;
    }
    Ok(conn)
}

fn migrate(conn: &Connection, from: i64, fresh: bool) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        for (v, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
            conn.execute_batch(sql)?;
            conn.execute_batch(&format!("PRAGMA user_version = {}", v + 1))?;
        }
        if fresh {
            conn.execute_batch(&format!("PRAGMA application_id = {APPLICATION_ID}"))?;
            let epoch = format!("{:08x}", fastrand::u32(..));
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('epoch', ?1)",
                [epoch],
            )?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Open an existing store for `edgeferry queue`, beside a daemon that may be running: never
/// creates, never migrates (the daemon owns the schema), waits for the daemon's short write
/// transactions instead of failing. A store of an older schema is refused: the daemon of this
/// version upgrades it when it starts.
pub fn open_admin(path: &Path, write: bool) -> Result<Connection, StoreError> {
    if !path.is_file() {
        return Err(StoreError::Missing {
            path: path.to_path_buf(),
        });
    }
    inspect(path)?;
    let mut flags = OpenFlags::SQLITE_OPEN_NO_MUTEX;
    flags |= if write {
        OpenFlags::SQLITE_OPEN_READ_WRITE
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    };
    let conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, e))?;
    let (fresh, version) = identity(path, &conn)?;
    if fresh || version < SCHEMA_VERSION {
        return Err(StoreError::TooOld {
            path: path.to_path_buf(),
            found: version,
            known: SCHEMA_VERSION,
        });
    }
    conn.execute_batch("PRAGMA busy_timeout = 5000; PRAGMA temp_store = FILE;")
        .map_err(|e| classify(path, e))?;
    Ok(conn)
}
