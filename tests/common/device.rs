//! A resilient device and a resilient upstream consumer for the chaos suite, in plain `std`
//! (blocking sockets, a minimal MQTT 3.1.1 codec) so that the chaos bench can include this file
//! too and drive Mosquitto's bridge with exactly the same clients and the same accounting.
//!
//! The device behaves like firmware with its own retry loop: QoS 1, a small window, and after
//! any connection loss it reconnects (clean session) and republishes everything that was not
//! PUBACKed, before anything new. It records, for every message, when it was first sent and when
//! (and in which life of the broker process) its PUBACK arrived, so a test can tell apart
//! "never acknowledged" (the device still has it) from "acknowledged, then lost".
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// ---- a minimal MQTT 3.1.1 codec ----------------------------------------------------------------

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
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
    out.extend_from_slice(body);
    out
}

fn connect_packet(client_id: &str, clean: bool, keepalive_s: u16) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, b"MQTT");
    body.push(4); // MQTT 3.1.1
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend_from_slice(&keepalive_s.to_be_bytes());
    put_str(&mut body, client_id.as_bytes());
    packet(0x10, &body)
}

fn publish_packet(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
    put_str(&mut body, topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

/// Read one packet: (first byte, body). Errors on EOF, timeout or a malformed length.
fn read_packet(s: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    s.read_exact(&mut first)?;
    let (mut len, mut mult) = (0usize, 1usize);
    for _ in 0..4 {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        len += (b[0] & 0x7f) as usize * mult;
        mult *= 128;
        if b[0] & 0x80 == 0 {
            let mut body = vec![0u8; len];
            s.read_exact(&mut body)?;
            return Ok((first[0], body));
        }
    }
    Err(io::Error::new(io::ErrorKind::InvalidData, "bad length"))
}

/// Connect and wait for a successful CONNACK.
fn mqtt_connect(
    port: u16,
    client_id: &str,
    clean: bool,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let mut s =
        TcpStream::connect_timeout(&std::net::SocketAddr::from(([127, 0, 0, 1], port)), timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(&connect_packet(client_id, clean, 30))?;
    let (first, body) = read_packet(&mut s)?;
    if first != 0x20 || body.len() < 2 || body[1] != 0 {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("CONNACK {first:#x} {body:?}"),
        ));
    }
    Ok(s)
}

// ---- the device ----------------------------------------------------------------------------

/// One PUBACKed message as the device saw it.
#[derive(Debug, Clone)]
pub struct Acked {
    pub payload: Vec<u8>,
    /// The broker life (see [`DeviceShared::life`]) of the connection that got the PUBACK.
    pub life: u32,
    /// Position among this device's PUBACKs (0, 1, 2, ...).
    pub order: u64,
    pub first_sent: Instant,
    pub acked_at: Instant,
    /// Sent more than once (republished after a connection loss).
    pub resent: bool,
}

/// Shared between the test and its devices.
#[derive(Default)]
pub struct DeviceShared {
    /// Set by the test: devices finish what they have in hand (bounded) and stop.
    pub stop: AtomicBool,
    /// Set by the test before each (re)start of the broker process: the life number a
    /// connection made from now on belongs to.
    pub life: AtomicU32,
    /// PUBACKs received, all devices.
    pub acks: AtomicU64,
    /// Successful (re)connections, all devices.
    pub connects: AtomicU64,
    /// When each payload was first handed to a connection, all devices (for recovery times).
    pub first_sent: Mutex<HashMap<Vec<u8>, Instant>>,
}

/// What a device did over its lifetime.
#[derive(Debug, Default)]
pub struct DeviceReport {
    pub acked: Vec<Acked>,
    /// Messages it gave up on (never PUBACKed before `stop` + the give-up deadline).
    pub unacked: Vec<Vec<u8>>,
    pub resends: u64,
    pub reconnects: u64,
}

pub struct DeviceOptions {
    pub port: u16,
    pub client_id: String,
    pub topic: String,
    /// Payloads are `{prefix}/{n:08}`.
    pub prefix: String,
    /// Publishes in flight at once.
    pub window: usize,
    /// Pause between windows (paces the load; zero for as fast as the broker acks).
    pub pause: Duration,
    /// Upper bound on fresh messages (the loop is bounded even if nobody sets `stop`).
    pub max_messages: u64,
    /// After `stop`, how long to keep trying to get the outstanding messages acknowledged.
    pub give_up_after: Duration,
}

/// Run one device on its own thread until `shared.stop` (then drain what it holds) or
/// `max_messages`.
pub fn spawn_device(o: DeviceOptions, shared: Arc<DeviceShared>) -> JoinHandle<DeviceReport> {
    std::thread::spawn(move || run_device(o, &shared))
}

fn run_device(o: DeviceOptions, shared: &DeviceShared) -> DeviceReport {
    let mut report = DeviceReport::default();
    // Not yet PUBACKed, oldest first: (payload, first sent, times sent).
    let mut pending: VecDeque<(Vec<u8>, Option<Instant>, u32)> = VecDeque::new();
    let mut next = 0u64;
    let mut stop_seen: Option<Instant> = None;
    let mut connected_once = false;
    'outer: loop {
        if shared.stop.load(Ordering::SeqCst) {
            let since = *stop_seen.get_or_insert_with(Instant::now);
            if pending.is_empty() || since.elapsed() > o.give_up_after {
                break;
            }
        }
        // (Re)connect, bounded: a broker that stays away for `give_up_after` ends the device.
        let mut s = match mqtt_connect(o.port, &o.client_id, true, Duration::from_secs(5)) {
            Ok(s) => s,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        // Read after the CONNACK: the process that answered was started after the test last
        // set `life` before it, and if it has been killed since, no PUBACK can come on this
        // connection, so every PUBACK here belongs to exactly this life.
        let life = shared.life.load(Ordering::SeqCst);
        shared.connects.fetch_add(1, Ordering::SeqCst);
        if connected_once {
            report.reconnects += 1;
        }
        connected_once = true;
        let mut pkid: u16 = 0;
        loop {
            let stopping = shared.stop.load(Ordering::SeqCst);
            if stopping && pending.is_empty() {
                break 'outer;
            }
            // Fill the window: what is pending first, then fresh messages.
            while pending.len() < o.window && !stopping && next < o.max_messages {
                pending.push_back((format!("{}/{next:08}", o.prefix).into_bytes(), None, 0));
                next += 1;
            }
            if pending.is_empty() {
                break 'outer;
            }
            let n = pending.len().min(o.window);
            let mut by_pkid: HashMap<u16, usize> = HashMap::new();
            let mut buf = Vec::new();
            for (i, (payload, first, times)) in pending.iter_mut().take(n).enumerate() {
                pkid = pkid.checked_add(1).unwrap_or(1);
                by_pkid.insert(pkid, i);
                buf.extend_from_slice(&publish_packet(&o.topic, pkid, payload));
                if first.is_none() {
                    let now = Instant::now();
                    *first = Some(now);
                    shared
                        .first_sent
                        .lock()
                        .unwrap()
                        .insert(payload.clone(), now);
                }
                if *times > 0 {
                    report.resends += 1;
                }
                *times += 1;
            }
            if s.write_all(&buf).is_err() {
                continue 'outer;
            }
            let mut done = vec![false; n];
            let mut left = n;
            while left > 0 {
                match read_packet(&mut s) {
                    Ok((first, body)) if first & 0xf0 == 0x40 && body.len() >= 2 => {
                        let id = u16::from_be_bytes([body[0], body[1]]);
                        if let Some(&i) = by_pkid.get(&id) {
                            if !done[i] {
                                done[i] = true;
                                left -= 1;
                                let (payload, first, times) = &pending[i];
                                report.acked.push(Acked {
                                    payload: payload.clone(),
                                    life,
                                    order: report.acked.len() as u64,
                                    first_sent: first.unwrap_or_else(Instant::now),
                                    acked_at: Instant::now(),
                                    resent: *times > 1,
                                });
                                shared.acks.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            // Keep what was not acknowledged, in order, at the front.
            let mut i = 0;
            pending.retain(|_| {
                let keep = i >= n || !done[i];
                i += 1;
                keep
            });
            if left > 0 {
                continue 'outer; // connection lost (or a PUBACK overdue): reconnect, resend
            }
            if !o.pause.is_zero() {
                std::thread::sleep(o.pause);
            }
        }
    }
    report.unacked = pending.into_iter().map(|(p, _, _)| p).collect();
    report
}

// ---- the upstream consumer -------------------------------------------------------------------

/// An MQTT 3.1.1 subscriber with a persistent session (clean session off, QoS 1) that reconnects
/// forever, so that an upstream broker with persistence can be stopped and restarted under it
/// without losing what it queued for the consumer. Records the first arrival time of each
/// payload and counts copies.
/// Per payload: first arrival and number of copies.
pub type Seen = Arc<Mutex<HashMap<Vec<u8>, (Instant, u32)>>>;

pub struct Consumer {
    pub seen: Seen,
    pub total: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Consumer {
    /// Subscribe to `filter` on 127.0.0.1:`port`; returns once the first SUBACK arrived.
    pub fn start(port: u16, client_id: &str, filter: &str) -> Consumer {
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let total = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (se, to, st) = (seen.clone(), total.clone(), stop.clone());
        let (client_id, filter) = (client_id.to_string(), filter.to_string());
        let thread = std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            while !st.load(Ordering::SeqCst) {
                let Ok(mut s) = mqtt_connect(port, &client_id, false, Duration::from_secs(2))
                else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let mut body = vec![0, 1];
                put_str(&mut body, filter.as_bytes());
                body.push(1);
                if s.write_all(&packet(0x82, &body)).is_err() {
                    continue;
                }
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let mut idle = Instant::now();
                loop {
                    if st.load(Ordering::SeqCst) {
                        return;
                    }
                    match read_packet(&mut s) {
                        Ok((first, body)) if first & 0xf0 == 0x30 => {
                            idle = Instant::now();
                            let qos = (first >> 1) & 3;
                            if body.len() < 2 {
                                break;
                            }
                            let tl = u16::from_be_bytes([body[0], body[1]]) as usize;
                            let mut at = 2 + tl;
                            if qos > 0 {
                                if body.len() < at + 2 {
                                    break;
                                }
                                let ack = packet(0x40, &body[at..at + 2]);
                                at += 2;
                                if s.write_all(&ack).is_err() {
                                    break;
                                }
                            }
                            let payload = body[at..].to_vec();
                            to.fetch_add(1, Ordering::SeqCst);
                            se.lock()
                                .unwrap()
                                .entry(payload)
                                .and_modify(|e: &mut (Instant, u32)| e.1 += 1)
                                .or_insert((Instant::now(), 1));
                        }
                        Ok((first, _)) if first & 0xf0 == 0x90 => {
                            if let Some(tx) = ready.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) =>
                        {
                            // Keep the session alive (keepalive 30s).
                            if idle.elapsed() > Duration::from_secs(10) {
                                if s.write_all(&[0xc0, 0]).is_err() {
                                    break;
                                }
                                idle = Instant::now();
                            }
                        }
                        Err(_) => break,
                    }
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("consumer: no SUBACK");
        Consumer {
            seen,
            total,
            stop,
            thread: Some(thread),
        }
    }

    /// Distinct payloads received so far.
    pub fn distinct(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn has(&self, payload: &[u8]) -> bool {
        self.seen.lock().unwrap().contains_key(payload)
    }

    /// Copies received beyond the first, over all payloads.
    pub fn duplicates(&self) -> u64 {
        self.seen
            .lock()
            .unwrap()
            .values()
            .map(|(_, n)| (*n as u64).saturating_sub(1))
            .sum()
    }

    /// Wait (bounded) until every payload of `want` arrived; returns how many are missing.
    pub fn wait_for_all<'a>(
        &self,
        want: impl IntoIterator<Item = &'a Vec<u8>> + Clone,
        limit: Duration,
    ) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let missing = {
                let seen = self.seen.lock().unwrap();
                want.clone()
                    .into_iter()
                    .filter(|w| !seen.contains_key(*w))
                    .count()
            };
            if missing == 0 || Instant::now() > deadline {
                return missing;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- accounting ---------------------------------------------------------------------------

/// Messages a device had PUBACKed that never arrived upstream, checked against the pre-commit
/// loss window.
///
/// The sound property (no wall-clock bound needed): ingest reads the broker's log in order and
/// commits it in order, and one device connection's PUBACKs come in log order. So among the
/// messages one device published once (never resent) within one broker life, those that were
/// committed form a prefix of its PUBACK order, and the lost ones a suffix: if a message is lost,
/// no message that device got a later PUBACK for in the same life may have arrived. Resent
/// messages are excluded because an earlier copy may have been committed by an earlier life.
/// Returns (lost, order violations as text). `killed_lives` are the lives that ended with
/// kill -9; a loss in any other life is a violation in itself.
pub fn lost_after_ack(
    reports: &[DeviceReport],
    arrived: &dyn Fn(&[u8]) -> bool,
    killed_lives: &[u32],
) -> (Vec<Acked>, Vec<String>) {
    let mut lost = Vec::new();
    let mut violations = Vec::new();
    for r in reports {
        let mut by_life: HashMap<u32, Vec<&Acked>> = HashMap::new();
        for a in &r.acked {
            by_life.entry(a.life).or_default().push(a);
        }
        for (life, acks) in by_life {
            let mut first_lost: Option<&Acked> = None;
            for a in acks {
                let here = arrived(&a.payload);
                if !here {
                    lost.push(a.clone());
                    if !killed_lives.contains(&life) {
                        violations.push(format!(
                            "{} was PUBACKed in life {life}, which ended without kill -9, and never arrived",
                            String::from_utf8_lossy(&a.payload)
                        ));
                    }
                    if !a.resent && first_lost.is_none() {
                        first_lost = Some(a);
                    }
                } else if let Some(l) = first_lost {
                    if !a.resent {
                        violations.push(format!(
                            "{} was lost although {}, PUBACKed after it in the same life {life}, arrived: loss outside the pre-commit window",
                            String::from_utf8_lossy(&l.payload),
                            String::from_utf8_lossy(&a.payload)
                        ));
                    }
                }
            }
        }
    }
    (lost, violations)
}
