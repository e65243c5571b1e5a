//! CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, init and xorout 0xFFFFFFFF.
//!
//! Table-driven and `const`-built so that the eBPF program and the daemon run the very same
//! code over the very same table: both sides provably agree on which frames are valid.

/// The reflected polynomial; the classic filter's CRC loop uses it too.
pub const POLY: u32 = 0x82F6_3B78;

/// The 256-entry lookup table, built at compile time.
pub static TABLE: [u32; 256] = build_table();

const fn build_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// Folds `byte` into a running (pre-inverted) CRC state.
#[inline(always)]
pub fn step(state: u32, byte: u8) -> u32 {
    TABLE[((state ^ byte as u32) & 0xff) as usize] ^ (state >> 8)
}

/// CRC-32C of `data`.
#[inline(always)]
pub fn checksum(data: &[u8]) -> u32 {
    let mut state = !0u32;
    for &b in data {
        state = step(state, b);
    }
    !state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3720_check_value() {
        assert_eq!(checksum(b"123456789"), 0xE306_9283);
        assert_eq!(checksum(b""), 0);
    }
}
