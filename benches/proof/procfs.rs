//! Readings from `/proc` for one process: CPU time, memory, context switches, disk writes.
//!
//! Everything here reads the live process; a reading of a process that has exited is `None`,
//! never a panic. CPU and context switches are summed over every thread of the process (the
//! `/proc/PID/status` switch counters are per task, so they are summed over `task/*`).

use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// Clock ticks per second for `/proc/PID/stat` (`getconf CLK_TCK`; 100 on every Linux we run).
fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// One snapshot of a process's counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snap {
    /// utime + stime + cutime + cstime, seconds (all threads; reaped children included).
    pub cpu_s: f64,
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Peak resident set size since start, KiB.
    pub hwm_kib: u64,
    /// Voluntary + involuntary context switches, summed over all threads.
    pub ctxsw: u64,
    /// Bytes this process caused to be written to storage (`/proc/PID/io` write_bytes).
    pub write_bytes: u64,
    /// Threads in the process.
    pub threads: u64,
}

fn status_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l[key.len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// CPU seconds from `/proc/PID/stat` (fields 14-17, counted after the `comm` field's `)`).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14 -> rest[11].
    let ticks: u64 = f
        .get(11..15)?
        .iter()
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    Some(ticks as f64 / clk_tck())
}

fn ctx_switches(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| fs::read_to_string(t.path().join("status")).ok())
        .map(|s| {
            status_field(&s, "voluntary_ctxt_switches:").unwrap_or(0)
                + status_field(&s, "nonvoluntary_ctxt_switches:").unwrap_or(0)
        })
        .sum()
}

/// Reads every counter; `None` once the process is gone.
pub fn snap(pid: u32) -> Option<Snap> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let io = fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    Some(Snap {
        cpu_s: cpu_seconds(pid)?,
        rss_kib: status_field(&status, "VmRSS:").unwrap_or(0),
        hwm_kib: status_field(&status, "VmHWM:").unwrap_or(0),
        ctxsw: ctx_switches(pid),
        write_bytes: status_field(&io, "write_bytes:").unwrap_or(0),
        threads: status_field(&status, "Threads:").unwrap_or(0),
    })
}

/// Samples a process's RSS every `period` on its own thread and keeps the peak, so a short spike
/// between two explicit snapshots is not missed. Stops when dropped or when the process exits.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32, period: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let handle = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match fs::read_to_string(format!("/proc/{pid}/status")) {
                    Ok(st) => {
                        let rss = status_field(&st, "VmRSS:").unwrap_or(0);
                        p.fetch_max(rss, Ordering::Relaxed);
                    }
                    Err(_) => break,
                }
                thread::sleep(period);
            }
        });
        RssSampler {
            stop,
            peak,
            handle: Some(handle),
        }
    }

    /// Peak RSS seen so far, KiB.
    pub fn peak_kib(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
