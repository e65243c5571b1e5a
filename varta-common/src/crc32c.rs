//! CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, init and xorout 0xFFFFFFFF.
//!
//! Table-driven and `const`-built so that the eBPF program and the daemon run the very same
//! code over the very same tables: both sides provably agree on which frames are valid.
//! Four bytes at a time ("slicing by four"): the byte-at-a-time loop is one chain of
//! dependent table loads, 28 of them per frame in the sender's `sendto`; four tables make
//! each word's four loads independent of one another.

/// The reflected polynomial; the classic filter's CRC loop uses it too.
pub const POLY: u32 = 0x82F6_3B78;

/// `TABLES[0]`: the state change of one byte; `TABLES[k]`: of one byte followed by `k`
/// zero bytes. Built at compile time.
pub static TABLES: [[u32; 256]; 4] = build_tables();

const fn build_tables() -> [[u32; 256]; 4] {
    let mut tables = [[0u32; 256]; 4];
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
        tables[0][i] = crc;
        i += 1;
    }
    let mut k = 1;
    while k < 4 {
        let mut i = 0;
        while i < 256 {
            let prev = tables[k - 1][i];
            tables[k][i] = (prev >> 8) ^ tables[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    tables
}

/// Folds `byte` into a running (pre-inverted) CRC state.
#[inline(always)]
pub fn step(state: u32, byte: u8) -> u32 {
    TABLES[0][((state ^ byte as u32) & 0xff) as usize] ^ (state >> 8)
}

/// Folds four bytes, `word` read little-endian, into a running (pre-inverted) CRC state:
/// the same as [`step`] over them one by one.
#[inline(always)]
pub fn step4(state: u32, word: u32) -> u32 {
    let x = state ^ word;
    TABLES[3][(x & 0xff) as usize]
        ^ TABLES[2][((x >> 8) & 0xff) as usize]
        ^ TABLES[1][((x >> 16) & 0xff) as usize]
        ^ TABLES[0][((x >> 24) & 0xff) as usize]
}

/// CRC-32C of `data`.
#[inline(always)]
pub fn checksum(data: &[u8]) -> u32 {
    let mut state = !0u32;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        state = step4(state, u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    }
    for &b in words.remainder() {
        state = step(state, b);
    }
    !state
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc3720_check_value() {
        assert_eq!(checksum(b"123456789"), 0xE306_9283);
        assert_eq!(checksum(b""), 0);
        // RFC 3720 B.4: 32 bytes of zeros, of ones.
        assert_eq!(checksum(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(checksum(&[0xffu8; 32]), 0x62A8_AB43);
    }

    /// The polynomial division one bit at a time: what the tables must agree with.
    fn bitwise(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ POLY
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    proptest! {
        #[test]
        fn four_at_a_time_agrees_with_one_bit_at_a_time(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(checksum(&data), bitwise(&data));
        }

        #[test]
        fn step4_is_four_steps(state in any::<u32>(), word in any::<u32>()) {
            let bytes = word.to_le_bytes();
            let one_by_one = bytes.iter().fold(state, |s, &b| step(s, b));
            prop_assert_eq!(step4(state, word), one_by_one);
        }
    }
}
