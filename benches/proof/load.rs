//! Load generator (device clients) and the upstream subscriber that checks what came out.
//!
//! Payload layout, little-endian: bytes 0..8 the message id (`client << 40 | seq`), 8..16 the
//! send time in nanoseconds since [`anchor`] (one process, one monotonic clock, so latency needs
//! no clock sync), then filler up to the payload size. The id is unique per run, so the
//! subscriber detects losses (ids acked by the system but never seen), duplicates (an id seen
//! twice) and reordering (a client's seq going backwards on its topic).
//!
//! The send time is taken when the publish is handed to the client library, after waiting for a
//! window slot: at a fixed offered rate a stalled system therefore shows up as a lower achieved
//! rate rather than as latency (no coordinated-omission correction).

use anyhow::{bail, Result};
use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

pub const PROBE_TOPIC: &str = "bench/probe";
const HEADER: usize = 16;

/// The process-wide time origin for send timestamps.
pub fn anchor() -> Instant {
    static A: OnceLock<Instant> = OnceLock::new();
    *A.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    anchor().elapsed().as_nanos() as u64
}

fn payload(id: u64, size: usize) -> Bytes {
    let mut v = vec![b'x'; size.max(HEADER)];
    v[..8].copy_from_slice(&id.to_le_bytes());
    v[8..16].copy_from_slice(&now_ns().to_le_bytes());
    Bytes::from(v)
}

fn client_opts(id: String, port: u16, clean: bool, inflight: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    // Short keepalive: pings are what wake an idle `poll`, bounding every wait on it.
    o.set_keep_alive(Duration::from_secs(5))
        .set_clean_session(clean)
        .set_inflight(inflight.max(1))
        .set_max_packet_size(256 * 1024, 256 * 1024)
        .set_request_channel_capacity(inflight.max(1) as usize * 2);
    o
}

// ------------------------------------------------------------------------------------------
// Subscriber

#[derive(Default)]
struct SubInner {
    seen: HashSet<u64>,
    last_seq: HashMap<u64, u64>,
    latencies_us: Vec<u32>,
    duplicates: u64,
    reordered: u64,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
    probes: u64,
}

/// The upstream subscriber's tallies, shared with the harness.
pub struct Subscriber {
    inner: Mutex<SubInner>,
    unique: AtomicU64,
    connected: AtomicBool,
    subscribed: AtomicBool,
    stop: AtomicBool,
    client: Mutex<Option<AsyncClient>>,
    pub conn_errors: AtomicU64,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SubReport {
    pub unique: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub lat_p50_ms: Option<f64>,
    pub lat_p99_ms: Option<f64>,
    pub lat_max_ms: Option<f64>,
}

impl Subscriber {
    /// Connects a QoS 1 subscriber to `bench/#` on the upstream. A persistent session
    /// (clean_session = false, fixed client id) so that messages forwarded while it reconnects
    /// after an upstream restart are queued for it by the upstream, not dropped.
    pub fn start(rt: &tokio::runtime::Runtime, port: u16, id: &str) -> Arc<Subscriber> {
        let sub = Arc::new(Subscriber {
            inner: Mutex::new(SubInner::default()),
            unique: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            client: Mutex::new(None),
            conn_errors: AtomicU64::new(0),
        });
        let mut o = client_opts(id.to_string(), port, false, 100);
        o.set_request_channel_capacity(16);
        let (client, mut el) = AsyncClient::new(o, 16);
        *sub.client.lock().unwrap() = Some(client.clone());
        let s = sub.clone();
        rt.spawn(async move {
            let _ = client.subscribe("bench/#", QoS::AtLeastOnce).await;
            // Bounded: the harness calls `stop()` (which also sends DISCONNECT to wake `poll`)
            // at the end of each run; the 1 h cap is a backstop. `poll` is never cancelled
            // mid-flight (rumqttc does not document it as cancel safe): keepalive pings wake it.
            let hard = Instant::now() + Duration::from_secs(3600);
            while !s.stop.load(Ordering::SeqCst) && Instant::now() < hard {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        s.connected.store(true, Ordering::Relaxed)
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        s.subscribed.store(true, Ordering::Relaxed)
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => s.record(&p.topic, &p.payload),
                    Ok(_) => {}
                    Err(_) => {
                        s.connected.store(false, Ordering::Relaxed);
                        s.conn_errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        sub
    }

    fn record(&self, topic: &str, p: &[u8]) {
        let at = Instant::now();
        let mut g = self.inner.lock().unwrap();
        if topic == PROBE_TOPIC {
            g.probes += 1;
            return;
        }
        if p.len() < HEADER {
            return;
        }
        let id = u64::from_le_bytes(p[..8].try_into().unwrap());
        let sent = u64::from_le_bytes(p[8..16].try_into().unwrap());
        if !g.seen.insert(id) {
            g.duplicates += 1;
            return;
        }
        let (client, seq) = (id >> 40, id & ((1 << 40) - 1));
        match g.last_seq.get(&client) {
            Some(&last) if seq < last => g.reordered += 1,
            _ => {
                g.last_seq.insert(client, seq);
            }
        }
        let lat_us = now_ns().saturating_sub(sent) / 1000;
        g.latencies_us.push(lat_us.min(u32::MAX as u64) as u32);
        g.first_at.get_or_insert(at);
        g.last_at = Some(at);
        self.unique.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets every id and latency: the next phase of the same run reuses ids.
    pub fn reset(&self) {
        let mut g = self.inner.lock().unwrap();
        let probes = g.probes;
        *g = SubInner {
            probes,
            ..SubInner::default()
        };
        self.unique.store(0, Ordering::Relaxed);
    }

    pub fn unique(&self) -> u64 {
        self.unique.load(Ordering::Relaxed)
    }
    pub fn probes(&self) -> u64 {
        self.inner.lock().unwrap().probes
    }
    pub fn first_last(&self) -> (Option<Instant>, Option<Instant>) {
        let g = self.inner.lock().unwrap();
        (g.first_at, g.last_at)
    }

    pub fn wait_subscribed(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.subscribed.load(Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("upstream subscriber not subscribed after {timeout:?}")
    }

    /// Waits until `target` unique ids arrived, or nothing new arrived for `quiet`, or
    /// `timeout` passed. Samples the cumulative count every 100 ms into the returned series
    /// (seconds since the call, count).
    pub fn wait_for(&self, target: u64, quiet: Duration, timeout: Duration) -> Vec<(f64, u64)> {
        let start = Instant::now();
        let mut series = vec![(0.0, self.unique())];
        let (mut last_n, mut last_change) = (self.unique(), start);
        while start.elapsed() < timeout {
            let n = self.unique();
            series.push((start.elapsed().as_secs_f64(), n));
            if n >= target {
                break;
            }
            if n != last_n {
                (last_n, last_change) = (n, Instant::now());
            } else if last_change.elapsed() > quiet {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        series
    }

    pub fn report(&self) -> SubReport {
        let mut g = self.inner.lock().unwrap();
        g.latencies_us.sort_unstable();
        let l = &g.latencies_us;
        let pct = |q: f64| -> Option<f64> {
            if l.is_empty() {
                return None;
            }
            let i = ((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1;
            Some(l[i] as f64 / 1000.0)
        };
        SubReport {
            unique: g.seen.len() as u64,
            duplicates: g.duplicates,
            reordered: g.reordered,
            lat_p50_ms: pct(0.50),
            lat_p99_ms: pct(0.99),
            lat_max_ms: l.last().map(|v| *v as f64 / 1000.0),
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(c) = self.client.lock().unwrap().take() {
            let _ = c.try_disconnect();
        }
    }
}

/// Publishes one QoS 1 probe to `port` and waits until the subscriber has seen it: proves the
/// whole path (device -> system -> upstream -> subscriber) is up before a measurement starts.
pub fn probe_path(
    rt: &tokio::runtime::Runtime,
    port: u16,
    sub: &Subscriber,
    timeout: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    let before = sub.probes();
    let (client, mut el) = AsyncClient::new(
        client_opts(format!("bench-probe-{}", fastrand::u32(..)), port, true, 4),
        8,
    );
    let deadline = start + timeout;
    let ok = rt.block_on(async {
        let poller = tokio::spawn(async move {
            // Aborted below; a throwaway connection, so cancelling `poll` costs nothing.
            loop {
                if el.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        // Re-send every 2 s: a system that is still connecting upstream may take a while.
        let mut ok = false;
        while Instant::now() < deadline && !ok {
            let _ = client
                .publish(PROBE_TOPIC, QoS::AtLeastOnce, false, b"probe".to_vec())
                .await;
            let until = (Instant::now() + Duration::from_secs(2)).min(deadline);
            while Instant::now() < until {
                if sub.probes() > before {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let _ = client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        poller.abort();
        ok
    });
    if !ok {
        bail!("probe on {PROBE_TOPIC} did not reach the upstream subscriber within {timeout:?}");
    }
    Ok(start.elapsed())
}

// ------------------------------------------------------------------------------------------
// Publishers

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoadSpec {
    pub clients: usize,
    /// QoS 1 publishes in flight (unacked) per client.
    pub window: usize,
    /// Target total rate, msg/s; `None` = as fast as the window allows.
    pub rate: Option<f64>,
    /// Stop after this many messages in total...
    pub total: Option<u64>,
    /// ...or after this long, whichever first.
    pub duration: Duration,
    pub payload: usize,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PubReport {
    pub sent: u64,
    pub acked: u64,
    /// Seconds from first publish to the last send.
    pub send_s: f64,
    /// Seconds from first publish to the last PUBACK.
    pub ack_s: f64,
    pub conn_errors: u64,
    /// Device-side PUBACK latency (publish written to the socket -> PUBACK read), p50/p99, ms.
    pub puback_p50_ms: Option<f64>,
    pub puback_p99_ms: Option<f64>,
}

struct PubShared {
    sent: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    last_ack_ns: AtomicU64,
    /// PUBACK latencies in microseconds, all clients.
    puback_us: Mutex<Vec<u32>>,
}

/// Runs the device clients to completion: publish per `spec`, then wait (up to `ack_timeout`)
/// for the outstanding PUBACKs, then disconnect.
pub fn run_publishers(
    rt: &tokio::runtime::Runtime,
    port: u16,
    spec: &LoadSpec,
    ack_timeout: Duration,
) -> Result<PubReport> {
    let shared = Arc::new(PubShared {
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        last_ack_ns: AtomicU64::new(0),
        puback_us: Mutex::new(Vec::new()),
    });
    let run_tag = fastrand::u32(..);
    let start_ns = now_ns();
    let t0 = Instant::now();
    let send_deadline = t0 + spec.duration;
    let hard_deadline = send_deadline + ack_timeout + Duration::from_secs(10);
    let n = spec.clients.max(1);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for ci in 0..n {
            let quota = spec
                .total
                .map(|t| t / n as u64 + u64::from((ci as u64) < t % n as u64));
            let per_client_rate = spec.rate.map(|r| r / n as f64);
            let opts = client_opts(
                format!("bench-dev-{run_tag:08x}-{ci}"),
                port,
                true,
                spec.window as u16,
            );
            let (client, el) = AsyncClient::new(opts, spec.window.max(1) * 2);
            let sh = shared.clone();
            let payload_size = spec.payload;
            let window = spec.window.max(1);
            tasks.push(tokio::spawn(async move {
                one_client(
                    ci as u64,
                    client,
                    el,
                    sh,
                    quota,
                    per_client_rate,
                    window,
                    payload_size,
                    send_deadline,
                    ack_timeout,
                    hard_deadline,
                )
                .await
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let last_ack = shared.last_ack_ns.load(Ordering::Relaxed);
    Ok(PubReport {
        sent: shared.sent.load(Ordering::Relaxed),
        acked: shared.acked.load(Ordering::Relaxed),
        send_s: t0.elapsed().as_secs_f64().min(spec.duration.as_secs_f64()),
        ack_s: if last_ack > start_ns {
            (last_ack - start_ns) as f64 / 1e9
        } else {
            0.0
        },
        conn_errors: shared.errors.load(Ordering::Relaxed),
        puback_p50_ms: quantile_ms(&shared.puback_us, 0.50),
        puback_p99_ms: quantile_ms(&shared.puback_us, 0.99),
    })
}

fn quantile_ms(v: &Mutex<Vec<u32>>, q: f64) -> Option<f64> {
    let mut v = v.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    Some(f64::from(v[i]) / 1000.0)
}

#[allow(clippy::too_many_arguments)]
async fn one_client(
    ci: u64,
    client: AsyncClient,
    mut el: EventLoop,
    sh: Arc<PubShared>,
    quota: Option<u64>,
    rate: Option<f64>,
    window: usize,
    payload_size: usize,
    send_deadline: Instant,
    ack_timeout: Duration,
    hard_deadline: Instant,
) {
    let sem = Arc::new(Semaphore::new(0));
    let my_sent = Arc::new(AtomicU64::new(0));
    let my_acked = Arc::new(AtomicU64::new(0));
    let done_sending = Arc::new(AtomicBool::new(false));
    // Event loop: drives the connection, returns a window slot on every PUBACK. Ends once
    // sending is done and every publish is acked (or `ack_timeout` passed). `poll` is never
    // cancelled; keepalive pings and the DISCONNECT sent below wake it.
    let ev = {
        let (sem, sh, my_sent, my_acked, done) = (
            sem.clone(),
            sh.clone(),
            my_sent.clone(),
            my_acked.clone(),
            done_sending.clone(),
        );
        tokio::spawn(async move {
            let mut written: HashMap<u16, Instant> = HashMap::new();
            let mut connected_once = false;
            let mut ack_deadline: Option<Instant> = None;
            while Instant::now() < hard_deadline {
                if done.load(Ordering::SeqCst) {
                    let d = *ack_deadline.get_or_insert(Instant::now() + ack_timeout);
                    if my_acked.load(Ordering::SeqCst) >= my_sent.load(Ordering::SeqCst)
                        || Instant::now() > d
                    {
                        break;
                    }
                }
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if !connected_once {
                            connected_once = true;
                            sem.add_permits(window);
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                        written.insert(pkid, Instant::now());
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(t) = written.remove(&ack.pkid) {
                            let us = t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                            sh.puback_us
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(us);
                        }
                        my_acked.fetch_add(1, Ordering::SeqCst);
                        sh.acked.fetch_add(1, Ordering::Relaxed);
                        sh.last_ack_ns.store(now_ns(), Ordering::Relaxed);
                        sem.add_permits(1);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        sh.errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            sem.close();
        })
    };
    let topic = format!("bench/dev{ci}");
    let interval = rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let mut next = Instant::now();
    let mut seq: u64 = 0;
    loop {
        if quota.is_some_and(|q| seq >= q) || Instant::now() >= send_deadline {
            break;
        }
        if let Some(iv) = interval {
            let now = Instant::now();
            if next > now {
                tokio::time::sleep_until(next.into()).await;
            } else if now - next > Duration::from_millis(100) {
                // Fell behind (the system stalled): do not burst to catch up.
                next = now;
            }
            next += iv;
        }
        let remaining = send_deadline.saturating_duration_since(Instant::now());
        let permit = match tokio::time::timeout(remaining, sem.acquire()).await {
            Ok(Ok(p)) => p,
            _ => break,
        };
        permit.forget();
        let id = (ci << 40) | seq;
        if client
            .publish_bytes(
                topic.clone(),
                QoS::AtLeastOnce,
                false,
                payload(id, payload_size),
            )
            .await
            .is_err()
        {
            break;
        }
        seq += 1;
        my_sent.fetch_add(1, Ordering::Relaxed);
        sh.sent.fetch_add(1, Ordering::Relaxed);
    }
    done_sending.store(true, Ordering::SeqCst);
    if my_acked.load(Ordering::SeqCst) >= my_sent.load(Ordering::SeqCst) {
        // Everything is acked already: wake the event loop so it sees `done`.
        let _ = client.try_disconnect();
    }
    let _ = ev.await;
}
