//! Stall deadlines ordered by time. Each agent has at most one entry; a beat does not touch
//! the queue (it only moves the agent's last-beat time), and an entry that comes due early
//! is pushed back to the agent's real deadline. So a beat costs O(1) and the daemon sleeps
//! until the earliest deadline without ever scanning all agents.

use std::{cmp::Reverse, collections::BinaryHeap};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub deadline_ns: u64,
    pub pid: u32,
    /// The tracker slot's generation: entries of an evicted agent are ignored.
    pub generation: u64,
}

#[derive(Debug, Default)]
pub struct StallQueue {
    heap: BinaryHeap<Reverse<Entry>>,
}

impl StallQueue {
    pub fn push(&mut self, entry: Entry) {
        self.heap.push(Reverse(entry));
    }

    pub fn peek(&self) -> Option<Entry> {
        self.heap.peek().map(|r| r.0)
    }

    /// The earliest entry if it is due at `now_ns`.
    pub fn pop_due(&mut self, now_ns: u64) -> Option<Entry> {
        if self.peek()?.deadline_ns <= now_ns {
            self.heap.pop().map(|r| r.0)
        } else {
            None
        }
    }

    pub fn pop(&mut self) -> Option<Entry> {
        self.heap.pop().map(|r| r.0)
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_deadline_order_only_when_due() {
        let mut q = StallQueue::default();
        for (d, pid) in [(30, 3), (10, 1), (20, 2)] {
            q.push(Entry {
                deadline_ns: d,
                pid,
                generation: 0,
            });
        }
        assert_eq!(q.pop_due(5), None);
        assert_eq!(q.pop_due(25).map(|e| e.pid), Some(1));
        assert_eq!(q.pop_due(25).map(|e| e.pid), Some(2));
        assert_eq!(q.pop_due(25), None);
        assert_eq!(q.peek().map(|e| e.deadline_ns), Some(30));
    }
}
