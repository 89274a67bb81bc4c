//! Counters kept per route in the `stats` table (depth, bytes, drops, dead letters by reason),
//! and the route names behind the ids rows carry.
//!
//! Every change is written as a delta in the same transaction as the rows it counts, so the
//! counters are exactly as durable as the rows; the table is a few pages, so this costs one small
//! page write per commit. Start-up and `edgeferry queue stats` read it instead of counting rows.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rusqlite::{params, Connection, Transaction};

/// Stat names (the `name` column). Dead letters are `dead.<reason>`, drops `drop.<reason>`.
pub const DEPTH: &str = "depth";
pub const BYTES: &str = "bytes";
/// Receive time (ms) of the oldest and newest message ever dropped from the route.
pub const DROP_FIRST_MS: &str = "drop_first_ms";
pub const DROP_LAST_MS: &str = "drop_last_ms";

pub fn drop_stat(reason: &str) -> String {
    format!("drop.{reason}")
}
pub fn dead_stat(reason: &str) -> String {
    format!("dead.{reason}")
}

/// The committed counters, mirrored in memory by the store thread.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    values: BTreeMap<(i64, String), i64>,
    ids: HashMap<Arc<str>, i64>,
    names: BTreeMap<i64, Arc<str>>,
}

impl Ledger {
    pub fn load(conn: &Connection) -> rusqlite::Result<Ledger> {
        let mut ledger = Ledger::default();
        let mut st = conn.prepare("SELECT id, name FROM routes")?;
        for r in st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))? {
            let (id, name) = r?;
            let name: Arc<str> = name.into();
            ledger.ids.insert(name.clone(), id);
            ledger.names.insert(id, name);
        }
        let mut st = conn.prepare("SELECT route, name, value FROM stats")?;
        for r in st.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })? {
            let (route, name, value) = r?;
            ledger.values.insert((route, name), value);
        }
        Ok(ledger)
    }

    pub fn get(&self, route: i64, name: &str) -> i64 {
        self.values
            .get(&(route, name.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Sum over all routes.
    pub fn total(&self, name: &str) -> i64 {
        self.values
            .iter()
            .filter(|((_, n), _)| n == name)
            .map(|(_, v)| *v)
            .sum()
    }

    /// Every (route, name, value), for stats and metrics.
    pub fn iter(&self) -> impl Iterator<Item = (i64, &str, i64)> {
        self.values.iter().map(|((r, n), v)| (*r, n.as_str(), *v))
    }

    pub fn route_id(&self, name: &str) -> Option<i64> {
        self.ids.get(name).copied()
    }

    pub fn route_name(&self, id: i64) -> Option<&Arc<str>> {
        self.names.get(&id)
    }

    pub fn routes(&self) -> impl Iterator<Item = (i64, &Arc<str>)> {
        self.names.iter().map(|(i, n)| (*i, n))
    }

    fn next_route_id(&self) -> i64 {
        self.names.keys().next_back().map_or(1, |m| (*m + 1).max(1))
    }

    /// Fold a committed delta in.
    pub fn apply(&mut self, d: &Delta) {
        for (id, name) in &d.new_routes {
            self.ids.insert(name.clone(), *id);
            self.names.insert(*id, name.clone());
        }
        for (k, v) in &d.adds {
            *self.values.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &d.mins {
            let e = self.values.entry(k.clone()).or_insert(*v);
            *e = (*e).min(*v);
        }
        for (k, v) in &d.maxs {
            let e = self.values.entry(k.clone()).or_insert(*v);
            *e = (*e).max(*v);
        }
    }
}

/// Changes made by one transaction, not yet committed.
#[derive(Debug, Default)]
pub struct Delta {
    adds: BTreeMap<(i64, String), i64>,
    mins: BTreeMap<(i64, String), i64>,
    maxs: BTreeMap<(i64, String), i64>,
    new_routes: Vec<(i64, Arc<str>)>,
}

impl Delta {
    pub fn add(&mut self, route: i64, name: &str, v: i64) {
        *self.adds.entry((route, name.to_string())).or_insert(0) += v;
    }

    /// This delta's change of a counter (not including the committed value).
    pub fn added(&self, route: i64, name: &str) -> i64 {
        self.adds
            .get(&(route, name.to_string()))
            .copied()
            .unwrap_or(0)
    }

    pub fn added_total(&self, name: &str) -> i64 {
        self.adds
            .iter()
            .filter(|((_, n), _)| n == name)
            .map(|(_, v)| *v)
            .sum()
    }

    /// Count a dropped message: by reason, and the receive-time range of what was dropped.
    pub fn dropped(&mut self, route: i64, reason: &str, size: i64, enqueued_ms: i64) {
        self.add(route, DEPTH, -1);
        self.add(route, BYTES, -size);
        self.add(route, &drop_stat(reason), 1);
        let k = (route, DROP_FIRST_MS.to_string());
        let e = self.mins.entry(k).or_insert(enqueued_ms);
        *e = (*e).min(enqueued_ms);
        let k = (route, DROP_LAST_MS.to_string());
        let e = self.maxs.entry(k).or_insert(enqueued_ms);
        *e = (*e).max(enqueued_ms);
    }

    /// The id of route `name`, allocating one (recorded in this delta) if it is new.
    pub fn route(&mut self, ledger: &Ledger, name: &Arc<str>) -> i64 {
        if let Some(id) = ledger.route_id(name) {
            return id;
        }
        if let Some((id, _)) = self.new_routes.iter().find(|(_, n)| n == name) {
            return *id;
        }
        let id = self
            .new_routes
            .last()
            .map_or(ledger.next_route_id(), |(i, _)| i + 1);
        self.new_routes.push((id, name.clone()));
        id
    }

    pub fn new_route_name(&self, id: i64) -> Option<Arc<str>> {
        self.new_routes
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, n)| n.clone())
    }

    pub fn has_new_routes(&self) -> bool {
        !self.new_routes.is_empty()
    }

    pub fn new_route_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.new_routes.iter().map(|(i, _)| *i)
    }

    /// Write into the open transaction.
    pub fn write(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        for (id, name) in &self.new_routes {
            tx.prepare_cached("INSERT OR IGNORE INTO routes (id, name) VALUES (?1, ?2)")?
                .execute(params![id, &**name])?;
        }
        let mut add = tx.prepare_cached(
            "INSERT INTO stats (route, name, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (route, name) DO UPDATE SET value = value + excluded.value",
        )?;
        for ((r, n), v) in &self.adds {
            if *v != 0 {
                add.execute(params![r, n, v])?;
            }
        }
        let mut min = tx.prepare_cached(
            "INSERT INTO stats (route, name, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (route, name) DO UPDATE SET value = min(value, excluded.value)",
        )?;
        for ((r, n), v) in &self.mins {
            min.execute(params![r, n, v])?;
        }
        let mut max = tx.prepare_cached(
            "INSERT INTO stats (route, name, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (route, name) DO UPDATE SET value = max(value, excluded.value)",
        )?;
        for ((r, n), v) in &self.maxs {
            max.execute(params![r, n, v])?;
        }
        Ok(())
    }
}
