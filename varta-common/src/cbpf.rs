//! The frame rules as a classic BPF program (`SO_ATTACH_FILTER`), for the userspace
//! datapath: any process may attach one to its own socket, without a capability, on every
//! kernel. It drops in the kernel what [`crate::Frame::decode`] would refuse (wrong length,
//! magic, version, CRC-32C, status, pid, timestamp, nonce), so a junk flood does not cost
//! the daemon a wake-up per frame.
//!
//! Classic BPF cannot count, so drops would be invisible: instead one junk datagram in
//! [`Layout::sample_one_in`] (chosen by the kernel's `SKF_AD_RANDOM`) is let through, and
//! the daemon decodes and counts it by reason like any other. The counters then count
//! samples; with 1 every datagram reaches the daemon and they are exact, and the program
//! checks nothing (its verdict would be "keep" whatever the checks said: they would only
//! cost each sender their ~1,300 instructions).
//!
//! The CRC is computed bit by bit, unrolled (five instructions a bit, 28 bytes): about 1,300
//! instructions of the 4,096 the kernel allows.
//!
//! A program may also deny frames by their pid ([`Layout::deny`]): the userspace datapath's
//! senders far over their rate, kept out of a queue they would otherwise fill for everyone
//! (a Unix datagram queue has no share per sender). The frames whose nonce is a multiple of
//! [`DENIED_SAMPLE_ONE_IN`] go on to the checks: the daemon sees that the sender still
//! floods, and the sender stays alive to it. By nonce, not at random: a client counts its
//! nonce up by one a beat, so the samples come evenly spaced, and a sender at 10,000 frames
//! a second is heard every ~0.1 s, never silent by chance for a stall threshold.

use crate::frame::{FRAME_LEN, MAGIC, VERSION};
#[cfg(test)]
use crate::frame::{SECURE_FRAME_LENS, UDP_HEADER_LEN};

/// One instruction, laid out as the kernel's `struct sock_filter`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// Most pids a program denies.
pub const MAX_DENIED: usize = 1024;

/// One frame of a denied pid in this many (by nonce) is let through: a power of two, at
/// most 65,536.
pub const DENIED_SAMPLE_ONE_IN: u32 = 1024;

/// How many times its rate a sender beats when the userspace datapath denies it.
pub const DENY_OVER_RATE: u32 = 10;

/// Pids compared in one run of the deny list: its conditional jumps reach at most 255 on.
const DENY_CHUNK: usize = 250;

/// The longest program this module builds: the checks, and the deny list in chunks of
/// [`DENY_CHUNK`] (each with a load, a jump over its tail, and a four-instruction tail).
pub const MAX_INSNS: usize = 1400 + MAX_DENIED + MAX_DENIED.div_ceil(DENY_CHUNK) * 6;

// Opcode parts, as in <linux/filter.h>.
const LD: u16 = 0x00;
const ST: u16 = 0x02;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const IMM: u16 = 0x00;
const ABS: u16 = 0x20;
const MEM: u16 = 0x60;
const LEN: u16 = 0x80;
const AND: u16 = 0x50;
const RSH: u16 = 0x70;
const XOR: u16 = 0xa0;
const JA: u16 = 0x00;
const JEQ: u16 = 0x10;
const JGT: u16 = 0x20;
const JSET: u16 = 0x40;
const X: u16 = 0x08;
const TAX: u16 = 0x00;
/// `SKF_AD_OFF + SKF_AD_RANDOM`: loading this "offset" yields a random u32.
const AD_RANDOM: u32 = (-0x1000i32 + 56) as u32;
const KEEP_ALL: u32 = u32::MAX;
const CRC_POLY: u32 = crate::crc32c::POLY;
const CRC_OFFSET: u32 = crate::frame::CRC_OFFSET as u32;

/// Where a frame starts in what the filter sees, and which datagram lengths it accepts.
#[derive(Debug, Clone, Copy)]
pub struct Layout<'a> {
    /// Bytes before the frame: 0 on a Unix socket, the 8-byte UDP header on UDP.
    pub offset: u32,
    /// Other frame lengths to let through unchecked (secure UDP frames: their content
    /// is authenticated in userspace).
    pub also_accept: &'a [u32],
    /// One junk datagram in this many reaches the daemon, to be counted by reason: a power
    /// of two (1: all of them).
    pub sample_one_in: u32,
    /// Frame pids whose frames are dropped but one in [`DENIED_SAMPLE_ONE_IN`] (at most
    /// [`MAX_DENIED`]; more are ignored).
    pub deny: &'a [u32],
}

/// Writes the program for `layout` into `out` (room for [`MAX_INSNS`]: a program is built
/// where its caller keeps it, not on a stack) and returns it. Every failing check jumps to
/// one shared "reject" tail that samples; jumps in classic BPF only go forward and
/// conditional ones at most 255 instructions, so a failing check takes a long `ja` to it.
pub fn build<'o>(layout: &Layout<'_>, out: &'o mut [SockFilter]) -> &'o [SockFilter] {
    let mut p = Builder::new(out);
    let off = layout.offset;
    let denied = &layout.deny[..layout.deny.len().min(MAX_DENIED)];
    if layout.sample_one_in <= 1 {
        // Every datagram is kept but the denied pids' frames (only frames carry a pid).
        if !denied.is_empty() {
            p.op(LD | W | LEN, 0);
            p.raw(JMP | JEQ, off + FRAME_LEN as u32, 1, 0);
            p.op(RET, KEEP_ALL);
            deny(&mut p, off, denied);
        }
        p.op(RET, KEEP_ALL);
        return p.done();
    }
    // Length: the plaintext frame, or one of the unchecked lengths (accepted at once).
    p.op(LD | W | LEN, 0);
    for &len in layout.also_accept {
        p.jump_if(JEQ, off + len, Target::Accept);
    }
    p.reject_unless(JEQ, off + FRAME_LEN as u32);
    deny(&mut p, off, denied);
    // Magic, version (network-order loads: the bytes as they are on the wire).
    p.op(LD | H | ABS, off);
    p.reject_unless(JEQ, u16::from_be_bytes(MAGIC) as u32);
    p.op(LD | B | ABS, off + 2);
    p.reject_unless(JEQ, VERSION as u32);
    // Status 0..=2 (3, Stall, is observer-only).
    p.op(LD | B | ABS, off + 3);
    p.jump_if(JGT, 2, Target::Reject);
    crc(&mut p, off);
    // pid (little-endian at 4..8) must be above 1: the big-endian word is then neither
    // 0x00000000 nor 0x01000000.
    p.op(LD | W | ABS, off + 4);
    p.jump_if(JEQ, 0, Target::Reject);
    p.jump_if(JEQ, 0x0100_0000, Target::Reject);
    // Timestamp u64::MAX is refused.
    all_ones_rejected(&mut p, off + 8, None);
    // Nonce u64::MAX is refused unless the status is Critical (the panic-terminal frame).
    all_ones_rejected(&mut p, off + 16, Some(off + 3));
    p.op(RET, KEEP_ALL);
    p.finish(layout.sample_one_in)
}

/// Drops frames whose pid is in `pids`, but those whose nonce is a multiple of
/// [`DENIED_SAMPLE_ONE_IN`], which go on to the checks. Fields are compared as the
/// big-endian loads see their little-endian bytes.
fn deny(p: &mut Builder, off: u32, pids: &[u32]) {
    for chunk in pids.chunks(DENY_CHUNK) {
        p.op(LD | W | ABS, off + 4);
        let n = chunk.len();
        for (i, pid) in chunk.iter().enumerate() {
            // To the tail, past the rest of the chunk and its `ja`.
            p.raw(JMP | JEQ, pid.swap_bytes(), (n - i) as u8, 0);
        }
        p.op(JMP | JA, 4);
        // The nonce's two low bytes (16, 17), loaded as one big-endian halfword.
        p.op(LD | H | ABS, off + 16);
        let low_bits = (DENIED_SAMPLE_ONE_IN - 1) as u16;
        p.op(ALU | AND, u32::from(low_bits.swap_bytes()));
        p.raw(JMP | JEQ, 0, 1, 0);
        p.op(RET, 0);
    }
}

/// Rejects when the 8 bytes at `at` are all 0xFF, unless `unless_critical_at` holds status
/// Critical (2).
fn all_ones_rejected(p: &mut Builder, at: u32, unless_critical_at: Option<u32>) {
    // "Not all ones" skips the rest of this check, up to and including its `ja`.
    let extra = if unless_critical_at.is_some() { 2 } else { 0 };
    p.op(LD | W | ABS, at);
    p.raw(JMP | JEQ, u32::MAX, 0, 3 + extra);
    p.op(LD | W | ABS, at + 4);
    p.raw(JMP | JEQ, u32::MAX, 0, 1 + extra);
    if let Some(status_at) = unless_critical_at {
        p.op(LD | B | ABS, status_at);
        p.raw(JMP | JEQ, 2, 1, 0);
    }
    p.long_jump(Target::Reject);
}

/// CRC-32C of bytes 0..28 compared with the little-endian CRC at 28..32.
fn crc(p: &mut Builder, off: u32) {
    p.op(LD | W | IMM, !0);
    for i in 0..CRC_OFFSET {
        p.op(ST, 0);
        p.op(LD | B | ABS, off + i);
        p.op(MISC | TAX, 0);
        p.op(LD | W | MEM, 0);
        p.op(ALU | XOR | X, 0);
        for _ in 0..8 {
            // if A & 1 { A = (A >> 1) ^ POLY } else { A >>= 1 }
            p.raw(JMP | JSET, 1, 0, 3);
            p.op(ALU | RSH, 1);
            p.op(ALU | XOR, CRC_POLY);
            p.op(JMP | JA, 1);
            p.op(ALU | RSH, 1);
        }
    }
    p.op(ALU | XOR, !0);
    p.op(ST, 0);
    for j in 0..4 {
        p.op(LD | B | ABS, off + CRC_OFFSET + j);
        p.op(MISC | TAX, 0);
        p.op(LD | W | MEM, 0);
        p.op(ALU | RSH, 8 * j);
        p.op(ALU | AND, 0xff);
        p.reject_unless_x(JEQ);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Accept,
    Reject,
}

struct Builder<'o> {
    insns: &'o mut [SockFilter],
    len: usize,
    /// Indices of `ja` instructions to the accept and reject tails, resolved by `finish`.
    fixups: [(usize, Target); 64],
    nfixups: usize,
}

impl<'o> Builder<'o> {
    fn new(insns: &'o mut [SockFilter]) -> Self {
        Builder {
            insns,
            len: 0,
            fixups: [(0, Target::Reject); 64],
            nfixups: 0,
        }
    }

    fn raw(&mut self, code: u16, k: u32, jt: u8, jf: u8) {
        self.insns[self.len] = SockFilter { code, jt, jf, k };
        self.len += 1;
    }

    fn op(&mut self, code: u16, k: u32) {
        self.raw(code, k, 0, 0);
    }

    fn long_jump(&mut self, target: Target) {
        self.fixups[self.nfixups] = (self.len, target);
        self.nfixups += 1;
        self.op(JMP | JA, 0);
    }

    /// Jumps to `target` when `A <cond> k`.
    fn jump_if(&mut self, cond: u16, k: u32, target: Target) {
        self.raw(JMP | cond, k, 0, 1);
        self.long_jump(target);
    }

    /// Rejects unless `A <cond> k`.
    fn reject_unless(&mut self, cond: u16, k: u32) {
        self.raw(JMP | cond, k, 1, 0);
        self.long_jump(Target::Reject);
    }

    /// Rejects unless `A <cond> X`.
    fn reject_unless_x(&mut self, cond: u16) {
        self.raw(JMP | cond | X, 0, 1, 0);
        self.long_jump(Target::Reject);
    }

    /// Appends the reject tail (sample one in `sample_one_in`, else drop) and the accept
    /// tail, and points the long jumps at them.
    fn finish(mut self, sample_one_in: u32) -> &'o [SockFilter] {
        let reject = self.len;
        self.op(LD | W | ABS, AD_RANDOM);
        self.op(
            ALU | AND,
            sample_one_in.next_power_of_two().saturating_sub(1),
        );
        self.raw(JMP | JEQ, 0, 1, 0);
        self.op(RET, 0);
        let accept = self.len;
        self.op(RET, KEEP_ALL);
        for &(at, target) in &self.fixups[..self.nfixups] {
            let to = if target == Target::Accept {
                accept
            } else {
                reject
            };
            self.insns[at].k = (to - at - 1) as u32;
        }
        self.done()
    }

    fn done(self) -> &'o [SockFilter] {
        &self.insns[..self.len]
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::{Frame, Status};

    /// Runs a program the way the kernel would (for the instructions this module emits):
    /// the kept length, 0 for a drop. `random` stands for `SKF_AD_RANDOM`.
    pub fn run(prog: &[SockFilter], pkt: &[u8], random: u32) -> u32 {
        let (mut a, mut x, mut mem, mut pc) = (0u32, 0u32, [0u32; 16], 0usize);
        let load = |at: u32, n: usize| -> Option<u32> {
            if at == AD_RANDOM {
                return Some(random);
            }
            let bytes = pkt.get(at as usize..at as usize + n)?;
            Some(bytes.iter().fold(0u32, |v, b| v << 8 | *b as u32))
        };
        loop {
            let i = prog[pc];
            pc += 1;
            let src = if i.code & X != 0 { x } else { i.k };
            match i.code {
                c if c == LD | W | LEN => a = pkt.len() as u32,
                c if c == LD | W | IMM => a = i.k,
                c if c == LD | W | MEM => a = mem[i.k as usize],
                c if c == LD | W | ABS => match load(i.k, 4) {
                    Some(v) => a = v,
                    None => return 0,
                },
                c if c == LD | H | ABS => match load(i.k, 2) {
                    Some(v) => a = v,
                    None => return 0,
                },
                c if c == LD | B | ABS => match load(i.k, 1) {
                    Some(v) => a = v,
                    None => return 0,
                },
                ST => mem[i.k as usize] = a,
                c if c == MISC | TAX => x = a,
                c if c & 0x07 == ALU => match c & 0xf0 {
                    AND => a &= src,
                    RSH => a >>= src,
                    XOR => a ^= src,
                    op => panic!("alu op {op:#x}"),
                },
                c if c == JMP | JA => pc += i.k as usize,
                c if c & 0x07 == JMP => {
                    let taken = match c & 0xf0 {
                        JEQ => a == src,
                        JGT => a > src,
                        JSET => a & src != 0,
                        op => panic!("jmp op {op:#x}"),
                    };
                    pc += if taken { i.jt } else { i.jf } as usize;
                }
                RET => return i.k,
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    fn kept(layout: &Layout<'_>, datagram: &[u8], random: u32) -> bool {
        let mut out = std::vec![SockFilter::default(); MAX_INSNS];
        run(build(layout, &mut out), datagram, random) != 0
    }

    const UDS: Layout<'static> = Layout {
        offset: 0,
        also_accept: &[],
        sample_one_in: 1024,
        deny: &[],
    };

    fn frame() -> Frame {
        Frame {
            status: Status::Ok,
            pid: 4242,
            timestamp: 7,
            nonce: 9,
            payload: 1,
        }
    }

    #[test]
    fn fits_the_kernel_limit_and_jumps_stay_in_range() {
        let many: std::vec::Vec<u32> = (2..2 + MAX_DENIED as u32 + 10).collect();
        let mut out = std::vec![SockFilter::default(); MAX_INSNS];
        for (deny, sample_one_in) in [(&[][..], 1024), (&many[..], 1024), (&many[..], 1)] {
            let p = build(
                &Layout {
                    offset: UDP_HEADER_LEN,
                    also_accept: &SECURE_FRAME_LENS,
                    sample_one_in,
                    deny,
                },
                &mut out,
            );
            assert!(p.len() <= 4096 && p.len() <= MAX_INSNS);
            for (at, i) in p.iter().enumerate().filter(|(_, i)| i.code & 0x07 == JMP) {
                let longest = if i.code == JMP | JA {
                    i.k as usize
                } else {
                    i.jt.max(i.jf) as usize
                };
                assert!(at + 1 + longest < p.len(), "jump out of program at {at}");
            }
        }
    }

    #[test]
    fn denied_pids_are_dropped_but_a_sample_that_still_passes_the_checks() {
        let many: std::vec::Vec<u32> = (100..100 + MAX_DENIED as u32).collect();
        let deny = Layout { deny: &many, ..UDS };
        let one_in = u64::from(DENIED_SAMPLE_ONE_IN);
        for pid in [100, 100 + DENY_CHUNK as u32, 100 + MAX_DENIED as u32 - 1] {
            let with_nonce = |nonce| {
                Frame {
                    pid,
                    nonce,
                    ..frame()
                }
                .encode()
            };
            for nonce in [1, one_in - 1, one_in + 1, 5 * one_in + 256, 1 << 40 | 7] {
                assert!(
                    !kept(&deny, &with_nonce(nonce), 0),
                    "pid {pid} nonce {nonce}"
                );
            }
            for nonce in [one_in, 3 * one_in, 1 << 40] {
                assert!(
                    kept(&deny, &with_nonce(nonce), 1),
                    "pid {pid}: the sample {nonce}"
                );
            }
            let mut bad = with_nonce(one_in);
            bad[31] ^= 1;
            assert!(!kept(&deny, &bad, 1), "pid {pid}: a sample is checked");
        }
        for pid in [99, 100 + MAX_DENIED as u32, 4242] {
            assert!(
                kept(&deny, &Frame { pid, ..frame() }.encode(), 1),
                "pid {pid}"
            );
        }
    }

    #[test]
    fn keeps_exactly_what_decode_accepts() {
        let good = frame().encode();
        assert!(kept(&UDS, &good, 1));
        let terminal = Frame {
            status: Status::Critical,
            nonce: u64::MAX,
            ..frame()
        };
        assert!(kept(&UDS, &terminal.encode(), 1));
        for bad in [
            Frame { pid: 1, ..frame() },
            Frame { pid: 0, ..frame() },
            Frame {
                timestamp: u64::MAX,
                ..frame()
            },
            Frame {
                nonce: u64::MAX,
                ..frame()
            },
            Frame {
                status: Status::Stall,
                ..frame()
            },
        ] {
            let raw = bad.encode();
            assert!(Frame::decode(&raw).is_err());
            assert!(!kept(&UDS, &raw, 1), "{bad:?}");
        }
        let mut crc = good;
        crc[31] ^= 0x80;
        assert!(!kept(&UDS, &crc, 1));
        assert!(!kept(&UDS, &good[..31], 1));
        assert!(kept(&UDS, &crc, 0), "a sampled drop reaches the daemon");
        assert!(!kept(&UDS, &crc, 1023));
        let all = Layout {
            sample_one_in: 1,
            ..UDS
        };
        assert!(
            kept(&all, &crc, 1023),
            "one in one: every datagram is sampled"
        );
    }

    /// Counting exactly, every datagram reaches the daemon: nothing is checked, but denied
    /// pids are still dropped (but their samples).
    #[test]
    fn exact_counting_keeps_everything_but_denied_frames() {
        let exact = Layout {
            sample_one_in: 1,
            ..UDS
        };
        let mut out = std::vec![SockFilter::default(); MAX_INSNS];
        assert_eq!(build(&exact, &mut out).len(), 1);
        let mut crc = frame().encode();
        crc[31] ^= 0x80;
        for junk in [&crc[..], &crc[..5], &[][..], &[0u8; 40][..]] {
            assert!(kept(&exact, junk, 7), "{junk:?}");
        }
        let denied = Layout {
            deny: &[4242],
            ..exact
        };
        assert!(kept(&denied, &crc[..5], 7), "too short to carry a pid");
        assert!(!kept(&denied, &frame().encode(), 0));
        let sample = Frame {
            nonce: u64::from(DENIED_SAMPLE_ONE_IN),
            ..frame()
        };
        assert!(kept(&denied, &sample.encode(), 7));
        assert!(kept(
            &denied,
            &Frame {
                pid: 4243,
                ..frame()
            }
            .encode(),
            7
        ));
    }

    #[test]
    fn udp_layout_skips_the_header_and_passes_secure_lengths() {
        let udp = Layout {
            offset: UDP_HEADER_LEN,
            also_accept: &SECURE_FRAME_LENS,
            sample_one_in: 1024,
            deny: &[],
        };
        let mut dgram = [0u8; 8 + 32];
        dgram[8..].copy_from_slice(&frame().encode());
        assert!(kept(&udp, &dgram, 1));
        dgram[9] = 0;
        assert!(!kept(&udp, &dgram, 1));
        assert!(kept(&udp, &[0u8; 8 + 60], 1));
        assert!(kept(&udp, &[0u8; 8 + 64], 1));
        assert!(!kept(&udp, &[0u8; 8 + 61], 1));
    }

    proptest::proptest! {
        #[test]
        fn agrees_with_decode_on_any_datagram(
            len in 0usize..=40,
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 40),
            field in 0usize..32,
            value in proptest::prelude::any::<u8>(),
        ) {
            // Half of the inputs are valid frames with one byte changed and the CRC resealed.
            let mut near = frame().encode();
            near[field] = value;
            if field < 28 {
                crate::frame::seal(&mut near);
            }
            for datagram in [&bytes[..len], &near[..]] {
                let decodes = <&[u8; FRAME_LEN]>::try_from(datagram)
                    .is_ok_and(|raw| Frame::decode(raw).is_ok());
                proptest::prop_assert_eq!(kept(&UDS, datagram, 1), decodes);
            }
        }
    }
}
