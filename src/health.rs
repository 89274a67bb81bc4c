//! Liveness probes: a leaf every stage can use without importing upward. A component polls its
//! [`ProbeRx`] in its own select loop and answers at once; the service's watchdog
//! (`service::systemd`) sends a probe to each and feeds systemd only when all answered, so a
//! stage stuck in an await elsewhere is noticed.

use tokio::sync::{mpsc, oneshot};

/// The receiving end a component polls in its select loop; answer each probe at once.
pub type ProbeRx = mpsc::Receiver<oneshot::Sender<()>>;

/// A component's name and the sending end of its probe channel.
pub struct Probe {
    pub name: String,
    pub(crate) tx: mpsc::Sender<oneshot::Sender<()>>,
}

pub fn probe(name: impl Into<String>) -> (Probe, ProbeRx) {
    // Capacity 1: an unanswered probe still in the channel means the component is stuck.
    let (tx, rx) = mpsc::channel(1);
    (
        Probe {
            name: name.into(),
            tx,
        },
        rx,
    )
}

/// Answer a probe (helper for select arms).
pub fn answer(reply: Option<oneshot::Sender<()>>) {
    if let Some(r) = reply {
        let _ = r.send(());
    }
}
