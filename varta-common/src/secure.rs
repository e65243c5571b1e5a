//! Lengths of the secure (ChaCha20-Poly1305) VLP frames on UDP. The eBPF UDP filter passes
//! datagrams of these lengths up unopened; the daemon authenticates and decrypts them.
//!
//! ```text
//! shared key (60): iv_random[8] | iv_counter[4] LE | ciphertext[32] | tag[16]
//! master key (64): agent_pid[4] LE | iv_random[8] | iv_counter[4] LE | ciphertext[32] | tag[16]
//! ```

/// A frame sealed with a shared key.
pub const SECURE_FRAME_LEN: usize = 60;
/// A frame sealed with a key derived from the master key and its `agent_pid` prefix.
pub const SECURE_MASTER_FRAME_LEN: usize = 64;
