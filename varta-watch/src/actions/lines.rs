//! The log output: one line per event that an operator acts on (beats are counted, not
//! logged). Each event's fields are given here once, typed; `sys::logger` encodes them.

use std::collections::HashMap;

use crate::{
    actions::identity::{Identity, known},
    sys::logger::event,
    vocab::{events::Event, recovery::Finished},
};

/// Logs `event`; `identities` names the agents whose identity was read.
pub fn log(event: &Event, identities: &HashMap<u32, Identity>) {
    let none = Identity::default();
    let id = |pid: &u32| identities.get(pid).unwrap_or(&none);
    match event {
        Event::Beat { .. } => {}
        Event::NewAgent {
            pid,
            frame_pid,
            origin,
            evicted,
            ..
        } => {
            let id = id(pid);
            event!(
                info,
                "agent_new",
                pid = pid,
                frame_pid = frame_pid,
                transport = origin.transport(),
                cross_namespace = origin.is_cross_namespace(),
                comm = known(&id.comm),
                unit = known(&id.unit),
                container_id = known(&id.container_id),
                pod_uid = known(&id.pod_uid),
            );
            if let Some(old) = evicted {
                event!(info, "agent_evicted", pid = old, for = pid);
            }
        }
        Event::Critical { pid, frame } => event!(
            warn,
            "critical",
            pid = pid,
            nonce = frame.nonce,
            payload = frame.payload,
        ),
        Event::Exit {
            pid,
            frame,
            known: k,
            ..
        } => {
            let id = id(pid);
            event!(
                warn,
                "exit",
                pid = pid,
                payload = frame.payload,
                reason = "panic_terminal_frame",
                known = k,
                comm = known(&id.comm),
                unit = known(&id.unit),
                container_id = known(&id.container_id),
                pod_uid = known(&id.pod_uid),
            );
        }
        Event::Stall {
            pid,
            last_nonce,
            last_status,
            origin,
            silent_ms,
            ..
        } => {
            let id = id(pid);
            event!(
                warn,
                "stall",
                pid = pid,
                silent_ms = silent_ms,
                last_nonce = last_nonce,
                last_status = last_status.name(),
                transport = origin.transport(),
                comm = known(&id.comm),
                unit = known(&id.unit),
                container_id = known(&id.container_id),
                pod_uid = known(&id.pod_uid),
            );
        }
        Event::Resumed { pid } => event!(info, "agent_resumed", pid = pid),
        Event::Replaced { pid } => {
            event!(info, "agent_replaced", pid = pid, reason = "pid_reused")
        }
        Event::Restarted { pid } => {
            event!(info, "agent_restarted", pid = pid, reason = "nonce_1")
        }
        Event::NonceWrapped { pid } => event!(info, "nonce_wrapped", pid = pid),
        Event::Recovery(Finished {
            pid,
            outcome,
            detail,
            ..
        }) => event!(
            info,
            "recovery",
            pid = pid,
            outcome = outcome.name(),
            detail = detail.as_str(),
        ),
    }
}
