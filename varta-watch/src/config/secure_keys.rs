//! The keys of secure UDP: shared keys (`--key-file`, plus `--accepted-key-file` during a
//! rotation) and a master key (`--master-key-file`) from which each agent's key is derived
//! with HKDF-SHA256. Keys live in zeroized memory and are never printed.

use std::{fmt, path::Path};

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::config::private_file::read_private;

pub type Key = Zeroizing<[u8; 32]>;

/// HKDF info prefix of an agent key; the agent's pid (LE) follows. The salt is empty.
const AGENT_KEY_INFO: &[u8; 15] = b"varta-agent-v1\0";

#[derive(Clone, Default)]
pub struct SecureKeys {
    /// Tried in order: the `--key-file` key first, then each accepted key.
    pub shared: Vec<Key>,
    pub master: Option<Key>,
}

impl fmt::Debug for SecureKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SecureKeys {{ shared: {} key(s), master: {} }}",
            self.shared.len(),
            self.master.is_some()
        )
    }
}

impl SecureKeys {
    pub fn is_empty(&self) -> bool {
        self.shared.is_empty() && self.master.is_none()
    }

    /// The key of the agent framing `pid` under the master key.
    pub fn agent_key(master: &[u8; 32], pid: u32) -> Key {
        let mut info = [0u8; 19];
        info[..15].copy_from_slice(AGENT_KEY_INFO);
        info[15..].copy_from_slice(&pid.to_le_bytes());
        let mut okm = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(None, master)
            .expand(&info, okm.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        okm
    }
}

/// One key from a file holding exactly one 64-hex-digit key.
pub fn read_key_file(path: &Path) -> Result<Key, String> {
    let text = read_private(path)?;
    let mut keys = keys_of(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    match keys.len() {
        1 => Ok(keys.remove(0)),
        n => Err(format!(
            "{}: holds {n} keys; give exactly one 64-hex-digit key",
            path.display()
        )),
    }
}

/// Every key of a file with one 64-hex-digit key per line (blank and `#` lines skipped).
pub fn read_accepted_keys(path: &Path) -> Result<Vec<Key>, String> {
    let text = read_private(path)?;
    let keys = keys_of(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if keys.is_empty() {
        return Err(format!("{}: holds no key", path.display()));
    }
    Ok(keys)
}

fn keys_of(text: &str) -> Result<Vec<Key>, String> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .map(|(n, line)| parse_hex_key(line).map_err(|e| format!("line {n}: {e}")))
        .collect()
}

fn parse_hex_key(hex: &str) -> Result<Key, String> {
    if hex.len() != 64 {
        return Err(format!(
            "a key is 64 hex digits, this one has {} characters",
            hex.len()
        ));
    }
    let mut key = Zeroizing::new([0u8; 32]);
    for (byte, pair) in key.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16).ok_or("a key is hex digits only");
        *byte = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_keys_parse_and_bad_ones_name_their_line() {
        let k = parse_hex_key(&"0f".repeat(32)).unwrap();
        assert_eq!(*k, [0x0f; 32]);
        assert!(parse_hex_key(&"0g".repeat(32)).is_err());
        assert!(parse_hex_key("00").is_err());
        let two = format!("# rotation\n{}\n\n{}\n", "00".repeat(32), "11".repeat(32));
        assert_eq!(keys_of(&two).unwrap().len(), 2);
        assert!(keys_of("# x\nzz\n").unwrap_err().starts_with("line 2"));
    }

    #[test]
    fn debug_never_prints_a_key() {
        let keys = SecureKeys {
            shared: vec![Zeroizing::new([0xab; 32])],
            master: None,
        };
        assert!(!format!("{keys:?}").contains("ab"));
    }
}
