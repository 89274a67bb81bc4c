//! A small ring of recent bad frames, so an operator can see what a misbehaving device actually
//! sent without the gateway keeping unbounded history.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::codec::BadFrame;

/// The last `capacity` bad frames, each with at most `max_bytes` bytes kept. Memory is bounded
/// by `capacity * max_bytes` plus a constant per entry.
#[derive(Debug, Clone)]
pub struct Quarantine {
    entries: VecDeque<BadFrame>,
    capacity: usize,
    max_bytes: usize,
}

impl Quarantine {
    /// A ring holding up to `capacity` frames (0 keeps nothing) of up to `max_bytes` bytes each.
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        Quarantine {
            entries: VecDeque::with_capacity(capacity),
            capacity,
            max_bytes,
        }
    }

    /// Keeps `bad`, evicting the oldest entry when full. The bytes are copied, so the entry does
    /// not pin a larger buffer it was sliced from.
    pub fn push(&mut self, mut bad: BadFrame) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        let keep = bad.bytes.len().min(self.max_bytes);
        bad.bytes = Bytes::copy_from_slice(&bad.bytes[..keep]);
        self.entries.push_back(bad);
    }

    /// The kept frames, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &BadFrame> {
        self.entries.iter()
    }

    /// How many frames are kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::ErrorKind;

    fn bad(n: u8, len: usize) -> BadFrame {
        BadFrame {
            kind: ErrorKind::Malformed,
            len,
            bytes: Bytes::from(vec![n; len]),
        }
    }

    #[test]
    fn keeps_the_newest_entries_truncated() {
        let mut q = Quarantine::new(2, 3);
        q.push(bad(1, 5));
        q.push(bad(2, 1));
        q.push(bad(3, 10));
        let kept: Vec<_> = q.iter().map(|b| (b.bytes.to_vec(), b.len)).collect();
        assert_eq!(kept, vec![(vec![2], 1), (vec![3, 3, 3], 10)]);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let mut q = Quarantine::new(0, 8);
        q.push(bad(1, 1));
        assert!(q.is_empty());
    }
}
