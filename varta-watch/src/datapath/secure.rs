//! The secure UDP frame decoder: authenticates and decrypts ChaCha20-Poly1305 frames
//! (60 bytes with a shared key, 64 with a master-derived agent key, see
//! `varta_common::secure`), decodes the VLP frame inside, and refuses replays.
//!
//! The AEAD nonce is `iv_random[8] || iv_counter[4]`; a master-key frame binds its
//! `agent_pid` prefix as AAD, and its inner frame must carry that pid. Tag checks are the
//! AEAD crate's (constant time).
//!
//! Replay protection: a sender's session is its key and `iv_random`; within a session
//! `iv_counter` must strictly increase. At most [`SESSIONS`] sessions are remembered; when
//! full, the session seen least recently is forgotten. A frame replayed from a forgotten
//! session authenticates again, and is then refused by the tracker's per-agent nonce check
//! while its agent is tracked. The sessions outlive the observer ([`SavedSession`], in the
//! state file and the takeover handover): the client's frame timestamp counts from its own
//! start, so no freshness window could refuse a capture replayed after a restart.

use std::collections::{HashMap, VecDeque};

use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag, aead::AeadInPlace};
use varta_common::{DropReason, FRAME_LEN, Frame, SECURE_FRAME_LEN, SECURE_MASTER_FRAME_LEN};

use crate::config::secure_keys::SecureKeys;

/// Sessions whose last counter is remembered.
pub const SESSIONS: usize = 65_536;

/// A session as the next instance takes it over: its key by fingerprint (the key files may
/// list the keys in another order by then, and a key no longer configured opens nothing),
/// the agent pid for a master-derived key (0 for a shared one), the sender's `iv_random`
/// and the last counter accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedSession {
    pub key: [u8; 8],
    pub pid: u32,
    pub iv_random: [u8; 8],
    pub counter: u32,
}

/// A key's name in the state file: the start of a hash of it, never the key.
fn fingerprint(key: &[u8; 32]) -> [u8; 8] {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"varta-session-key\0")
        .chain_update(key)
        .finalize();
    digest[..8].try_into().expect("8 bytes")
}

/// What the UDP socket accepts: secure frames when keys are configured, plaintext ones
/// with `--i-accept-plaintext-udp`; any other datagram is counted by why it was refused.
#[derive(Debug)]
pub struct UdpFrames {
    plaintext: bool,
    secure: Option<SecureDecoder>,
}

impl UdpFrames {
    pub fn new(plaintext: bool, keys: SecureKeys) -> Self {
        UdpFrames {
            plaintext,
            secure: (!keys.is_empty()).then(|| SecureDecoder::new(keys)),
        }
    }

    /// The replay sessions, least recently seen first.
    pub fn sessions(&self) -> Vec<SavedSession> {
        self.secure
            .as_ref()
            .map_or(Vec::new(), SecureDecoder::sessions)
    }

    /// Takes over a previous instance's sessions (those of keys still configured).
    pub fn restore_sessions(&mut self, saved: &[SavedSession]) {
        if let Some(secure) = &mut self.secure {
            secure.restore_sessions(saved);
        }
    }

    pub fn decode(&mut self, bytes: &[u8]) -> Result<Frame, DropReason> {
        match (bytes.len(), &mut self.secure) {
            (FRAME_LEN, _) if self.plaintext => {
                super::decode(bytes.try_into().expect("FRAME_LEN bytes"), "udp")
            }
            // A secure-only port: the frame is well-formed perhaps, but nobody vouches for it.
            (FRAME_LEN, _) => Err(DropReason::Plaintext),
            (_, Some(secure)) => secure.open(bytes),
            _ => Err(DropReason::Length),
        }
    }
}

/// A session: which key (0.. shared keys in order, or `MASTER` with the agent pid) and
/// the sender's `iv_random`.
type Session = (u32, u32, [u8; 8]);
const MASTER: u32 = u32::MAX;

#[derive(Debug)]
pub struct SecureDecoder {
    keys: SecureKeys,
    /// Master-derived agent keys by pid: HKDF once per agent, not per frame.
    agent_keys: HashMap<u32, crate::config::secure_keys::Key>,
    last_counter: HashMap<Session, u32>,
    /// Sessions by when they were last accepted, oldest first (may hold stale entries,
    /// skipped on eviction: each accept pushes once).
    order: VecDeque<(Session, u64)>,
    seen: HashMap<Session, u64>,
    tick: u64,
}

impl SecureDecoder {
    pub fn new(keys: SecureKeys) -> Self {
        SecureDecoder {
            keys,
            agent_keys: HashMap::new(),
            last_counter: HashMap::new(),
            order: VecDeque::new(),
            seen: HashMap::new(),
            tick: 0,
        }
    }

    /// The frame inside an authenticated, fresh secure datagram.
    pub fn open(&mut self, wire: &[u8]) -> Result<Frame, DropReason> {
        let (session_key, body, aad, agent_pid) = match wire.len() {
            SECURE_FRAME_LEN if !self.keys.shared.is_empty() => (None, wire, &[][..], None),
            SECURE_MASTER_FRAME_LEN if self.keys.master.is_some() => {
                let pid = u32::from_le_bytes(wire[..4].try_into().expect("4 bytes"));
                (Some(pid), &wire[4..], &wire[..4], Some(pid))
            }
            _ => return Err(DropReason::Length),
        };
        let iv_random: [u8; 8] = body[..8].try_into().expect("8 bytes");
        let counter = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
        let nonce = Nonce::from_slice(&body[..12]);
        let tag = Tag::from_slice(&body[12 + FRAME_LEN..]);
        let sealed: [u8; FRAME_LEN] = body[12..12 + FRAME_LEN].try_into().expect("32 bytes");

        let try_key = |key: &[u8; 32]| {
            let mut plain = zeroize::Zeroizing::new(sealed);
            ChaCha20Poly1305::new(key.into())
                .decrypt_in_place_detached(nonce, aad, plain.as_mut(), tag)
                .ok()
                .map(|()| *plain)
        };
        let (slot, plain) = match (session_key, &self.keys.master) {
            (Some(pid), Some(master)) => {
                if self.agent_keys.len() >= SESSIONS && !self.agent_keys.contains_key(&pid) {
                    self.agent_keys.clear();
                }
                let key = self
                    .agent_keys
                    .entry(pid)
                    .or_insert_with(|| SecureKeys::agent_key(master, pid));
                ((MASTER, pid), try_key(key).ok_or(DropReason::Auth)?)
            }
            // Every key is tried, whichever opens the frame: how long a frame takes does
            // not tell which rotation slot holds the key (L7 of the hardening review).
            _ => self
                .keys
                .shared
                .iter()
                .enumerate()
                .fold(None, |found, (i, key)| {
                    let opened = try_key(key).map(|p| ((i as u32, 0), p));
                    found.or(opened)
                })
                .ok_or(DropReason::Auth)?,
        };
        let frame = Frame::decode(&plain).map_err(|_| DropReason::Decrypt)?;
        if agent_pid.is_some_and(|pid| pid != frame.pid) {
            return Err(DropReason::Decrypt);
        }
        self.fresh((slot.0, slot.1, iv_random), counter)?;
        Ok(frame)
    }

    fn fingerprint_of(&self, slot: u32) -> Option<[u8; 8]> {
        match slot {
            MASTER => self.keys.master.as_ref().map(|k| fingerprint(k)),
            i => self.keys.shared.get(i as usize).map(|k| fingerprint(k)),
        }
    }

    fn sessions(&self) -> Vec<SavedSession> {
        let fingerprints: Vec<_> = (0..self.keys.shared.len() as u32)
            .chain([MASTER])
            .map(|slot| (slot, self.fingerprint_of(slot)))
            .collect();
        let key = |slot| fingerprints.iter().find(|(s, _)| *s == slot)?.1;
        self.order
            .iter()
            .filter(|(session, tick)| self.seen.get(session) == Some(tick))
            .filter_map(|(session @ (slot, pid, iv_random), _)| {
                Some(SavedSession {
                    key: key(*slot)?,
                    pid: *pid,
                    iv_random: *iv_random,
                    counter: *self.last_counter.get(session)?,
                })
            })
            .collect()
    }

    fn restore_sessions(&mut self, saved: &[SavedSession]) {
        let slots: Vec<_> = (0..self.keys.shared.len() as u32)
            .chain([MASTER])
            .filter_map(|slot| Some((self.fingerprint_of(slot)?, slot)))
            .collect();
        for s in saved {
            if let Some(&(_, slot)) = slots.iter().find(|(key, _)| *key == s.key) {
                // Oldest first: the least recently seen stay first to be forgotten.
                let _ = self.fresh((slot, s.pid, s.iv_random), s.counter);
            }
        }
    }

    /// Accepts a counter above its session's last one, remembering it.
    fn fresh(&mut self, session: Session, counter: u32) -> Result<(), DropReason> {
        if self
            .last_counter
            .get(&session)
            .is_some_and(|&last| counter <= last)
        {
            return Err(DropReason::Replay);
        }
        if !self.last_counter.contains_key(&session) && self.last_counter.len() >= SESSIONS {
            self.evict_one();
        }
        self.last_counter.insert(session, counter);
        self.tick += 1;
        self.seen.insert(session, self.tick);
        self.order.push_back((session, self.tick));
        // Stale entries outnumbering live ones: compact, so `order` stays bounded too.
        if self.order.len() > 2 * SESSIONS {
            let seen = &self.seen;
            self.order.retain(|(s, t)| seen.get(s) == Some(t));
        }
        Ok(())
    }

    fn evict_one(&mut self) {
        while let Some((session, tick)) = self.order.pop_front() {
            if self.seen.get(&session) == Some(&tick) {
                self.seen.remove(&session);
                self.last_counter.remove(&session);
                return;
            }
        }
    }
}

#[cfg(test)]
#[path = "secure_tests.rs"]
mod tests;
