//! Rule 6 of `varta_common::wakeup`, the daemon's side: which tracked agents the kernel holds
//! routine beats for (their `Tracked` entries in their hold slots), and folding those beats
//! in.

use varta_common::{
    Frame, Status,
    filter::{TRACKED, TRACKED_EXIT_WATCHED, TRANSPORT_UDS, Tracked, agent_key, hold_slot},
};

use super::{EbpfDatapath, KernelAgent};
use crate::{
    datapath::HeldSeen,
    sys::{logger::event, pidfd::ExitWatcher},
    vocab::beat::{Beat, Origin, SenderStart},
};

impl EbpfDatapath {
    /// Writes the entry of `pid` (under `key`), its held count from zero: watched with what
    /// `confirmed` says (the beat the kernel attested after the agent's exit watch began, and
    /// its origin), else tracked only. What the entry held until now is folded in first (a
    /// beat the kernel holds between that read and the write is lost: microseconds, at a
    /// change of the agent's state).
    pub(super) fn write_tracked(
        &mut self,
        pid: u32,
        key: u64,
        confirmed: Option<(&Frame, &Origin)>,
    ) -> Result<(), aya::maps::MapError> {
        // Read once: what it held is folded in, and who owns it decides the write below.
        let slot = self.read_slot(key);
        if let Some(mine) = slot.and_then(|s| s.mine()) {
            let folded = self.fold(pid, key, &mine);
            self.pending.extend(folded);
        }
        let since_ns = self.clock.now_ns();
        let entry = match confirmed {
            Some((frame, origin)) => Tracked {
                state: TRACKED_EXIT_WATCHED,
                status: frame.status as u8,
                cross_namespace: origin.is_cross_namespace() as u8,
                frame_pid: frame.pid,
                nonce: frame.nonce,
                since_ns,
                ..Tracked::default()
            },
            None => Tracked {
                state: TRACKED,
                since_ns,
                ..Tracked::default()
            },
        };
        self.tracked.insert(key, entry, 0)?;
        if let Some(slot) = slot {
            self.write_hold(slot, confirmed.is_some().then_some(entry));
        }
        self.folded.insert(
            key,
            HeldSeen {
                key,
                since_ns,
                held: 0,
            },
        );
        Ok(())
    }

    /// The hold slot of `key` (a UDS agent's) as the kernel has it now, whoever owns it.
    fn read_slot(&self, key: u64) -> Option<SlotRead> {
        let tgid = uds_tgid(key)?;
        let entry = self.hold.get(&hold_slot(tgid), 0).ok()?;
        Some(SlotRead { tgid, entry })
    }

    /// Gives the agent's hold slot `entry` (the kernel holds its routine beats from there)
    /// when the slot is free or the agent's own; with no entry, frees the slot if it is the
    /// agent's. A slot another agent owns stays that agent's: this one's beats all go
    /// through the ring.
    fn write_hold(&mut self, slot: SlotRead, entry: Option<Tracked>) {
        let (tgid, owner) = (slot.tgid, slot.entry.tgid);
        let write = match entry {
            Some(entry) if owner == 0 || owner == tgid => Tracked { tgid, ..entry },
            None if owner == tgid => Tracked::default(),
            _ => return,
        };
        if let Err(e) = self.hold.set(hold_slot(tgid), write, 0) {
            event!(debug, "ebpf_hold_slot_failed", pid = tgid, error:% = e);
        }
    }

    /// `key`'s entry in its hold slot, if the agent owns the slot.
    fn held_entry(&self, key: u64) -> Option<Tracked> {
        self.read_slot(key)?.mine()
    }

    /// `key` is no longer tracked: out of its hold slot, then out of the kernel's tracked
    /// map. In that order (and the other way round in `write_tracked`), an owned slot always
    /// belongs to a tracked agent, whatever step a crash interrupts: no slot keeps holding
    /// beats that no instance folds in.
    pub(super) fn untrack(&mut self, key: u64) {
        if let Some(slot) = self.read_slot(key) {
            self.write_hold(slot, None);
        }
        let _ = self.tracked.remove(&key);
    }

    /// A beat of `key` came through the ring: if the agent's exit watch began before the
    /// kernel attested it, the kernel may hold its routine beats from now on.
    pub(super) fn confirm(&mut self, pid: u32, key: u64, frame: &Frame, origin: &Origin) {
        if self.unconfirmed.remove(&key) {
            let _ = self.write_tracked(pid, key, Some((frame, origin)));
        }
    }

    /// Watches `tgid`'s exit unless that is done already; `false` when it cannot be (gone,
    /// or the descriptor budget is spent), or rule 6 is off.
    pub(super) fn watch_exit(&mut self, tgid: u32) -> bool {
        if self.filter_config.hold_routine == 0 {
            return false;
        }
        self.watched.contains(&tgid)
            || ExitWatcher::open(tgid).is_ok_and(|pidfd| self.keep_watch(tgid, pidfd))
    }

    /// Watches `tgid`'s exit through `pidfd` unless it is watched already (one watch per
    /// process, whatever it is kept for: a verdict, held beats); `false` when the descriptor
    /// budget is spent.
    pub(super) fn keep_watch(&mut self, tgid: u32, pidfd: std::os::fd::OwnedFd) -> bool {
        if self.watched.contains(&tgid) {
            return true;
        }
        let watching = self.exits.watch(tgid, pidfd).is_ok();
        if watching {
            self.watched.insert(tgid);
        }
        watching
    }

    /// The routine beats the kernel held for each tracked agent since they were last folded
    /// in, one folded beat per agent.
    pub(super) fn held_beats(&mut self) -> Vec<Beat> {
        let agents: Vec<(u32, u64)> = self
            .tracked_keys
            .iter()
            .filter(|(pid, _)| self.watched.contains(pid))
            .map(|(&pid, &key)| (pid, key))
            .collect();
        agents
            .into_iter()
            .filter_map(|(pid, key)| {
                let entry = self.held_entry(key)?;
                self.fold(pid, key, &entry)
            })
            .collect()
    }

    /// The beats the kernel held in `key`'s hold slot `entry` that were not folded in yet,
    /// as one beat of `pid`.
    fn fold(&mut self, pid: u32, key: u64, entry: &Tracked) -> Option<Beat> {
        let now = seen(key, entry);
        let held = now.since(self.folded.get(&key));
        self.folded.insert(key, now);
        folded_beat(pid, entry, held)
    }

    /// Every agent the pinned maps say the previous instance tracked.
    pub fn kernel_agents(&self) -> Vec<KernelAgent> {
        self.tracked
            .iter()
            .filter_map(Result::ok)
            .map(|(key, entry)| {
                let entry = self.held_entry(key).unwrap_or(entry);
                let bucket = self.buckets.get(&key, 0).ok().filter(|b| b.last_ns != 0);
                // A held beat is later than the last one through the ring.
                let last = match bucket {
                    Some(b) => Some((b.last_ns.max(entry.last_ns), b.pid, b.frame_pid)),
                    None if entry.last_ns != 0 => {
                        Some((entry.last_ns, key as u32, entry.frame_pid))
                    }
                    None => None,
                };
                KernelAgent {
                    key,
                    transport: (key >> 32) as u8,
                    last,
                    held: seen(key, &entry),
                }
            })
            .collect()
    }

    /// What a previous instance folded in (from its state): the beats held since wait for the
    /// next drain, and count from there.
    pub(super) fn restore_held(&mut self, before: &[HeldSeen]) {
        self.folded.extend(before.iter().map(|s| (s.key, *s)));
        let keys: Vec<u64> = self.tracked.keys().filter_map(Result::ok).collect();
        for key in keys {
            // Restored agents are tracked under their key's pid (`Origin::agent_key`).
            if let Some(entry) = self.held_entry(key) {
                let folded = self.fold(key as u32, key, &entry);
                self.pending.extend(folded);
            }
        }
    }
}

/// A UDS agent's hold slot as read: the agent's host tgid and the slot's entry.
#[derive(Clone, Copy)]
struct SlotRead {
    tgid: u32,
    entry: Tracked,
}

impl SlotRead {
    /// The entry, if the agent owns the slot.
    fn mine(self) -> Option<Tracked> {
        (self.entry.tgid == self.tgid).then_some(self.entry)
    }
}

/// The host tgid of a UDS agent's key (the only agents whose beats the kernel holds).
fn uds_tgid(key: u64) -> Option<u32> {
    let tgid = key as u32;
    (key == agent_key(TRANSPORT_UDS, tgid, tgid) && tgid != 0).then_some(tgid)
}

fn seen(key: u64, entry: &Tracked) -> HeldSeen {
    HeldSeen {
        key,
        since_ns: entry.since_ns,
        held: entry.held,
    }
}

/// `held` beats of `pid` as one: the latest's nonce, status and receive time.
fn folded_beat(pid: u32, entry: &Tracked, held: u64) -> Option<Beat> {
    if held == 0 {
        return None;
    }
    Some(Beat {
        pid,
        frame: Frame {
            status: Status::from_u8(entry.status)?,
            pid: entry.frame_pid,
            timestamp: 0,
            nonce: entry.nonce,
            payload: 0,
        },
        origin: Origin::Uds {
            cross_namespace: entry.cross_namespace != 0,
        },
        recv_ns: entry.last_ns,
        rate_limited: true,
        sender: SenderStart::Unknown,
        held,
    })
}
