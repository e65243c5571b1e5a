//! The daemon's attestation decision (`varta_watch::datapath::attest`), behind the decoder:
//! for any frame, attested pid, /proc view of the sender and policy, an accepted frame
//! carries the honest pid, is tracked under the attested pid, and comes from another
//! namespace only when that is allowed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use varta_common::{DropReason, FRAME_LEN, Frame};
use varta_watch::{datapath::attest::Attestation, sys::procfs::Sender};

fn u32_at(data: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = data.get(at + i).copied().unwrap_or(0);
    }
    u32::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = data.get(..FRAME_LEN) else {
        return;
    };
    let Ok(frame) = Frame::decode(bytes.try_into().unwrap()) else {
        return;
    };
    let rest = &data[FRAME_LEN..];
    let flags = rest.first().copied().unwrap_or(0);
    let attested = u32_at(rest, 1);
    let own_pid = u32_at(rest, 5);
    let allow = flags & 1 != 0;
    // Small pids are likely in the input: let the frame's pid be reused often.
    let (attested, own_pid) = if flags & 8 != 0 {
        (frame.pid, own_pid)
    } else {
        (attested, frame.pid.wrapping_add(own_pid % 2))
    };
    let sender = match flags >> 1 & 3 {
        0 => None,
        1 => Some(Sender {
            cross_namespace: false,
            own_pid,
        }),
        _ => Some(Sender {
            cross_namespace: true,
            own_pid,
        }),
    };
    let decision = Attestation::new(allow);
    let foreign = sender.filter(|s| s.cross_namespace);
    let honest = foreign.map_or(attested, |s| s.own_pid);
    match decision.check(attested, sender.as_ref(), frame.pid) {
        Ok(a) => {
            assert_eq!(
                frame.pid, honest,
                "accepted a frame not carrying the honest pid"
            );
            assert_eq!(
                a.pid, attested,
                "tracked under another pid than the attested one"
            );
            assert_eq!(a.cross_namespace, foreign.is_some());
            assert!(
                !a.cross_namespace || allow,
                "a foreign sender without the flag"
            );
        }
        Err(DropReason::Spoof) => assert_ne!(frame.pid, honest, "an honest frame refused as spoof"),
        Err(DropReason::Namespace) => {
            assert!(foreign.is_some() && !allow && frame.pid == honest);
        }
        Err(other) => panic!("unexpected refusal {other:?}"),
    }
});
