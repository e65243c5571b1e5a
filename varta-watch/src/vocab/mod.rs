//! The shared vocabulary, below every stage: what the stages hand each other. Beats and
//! their origins (datapath -> observer), drop counters (every stage counts, the metrics
//! read), events (observer -> actions), recovery outcomes (actions -> the event loop ->
//! actions).

pub mod beat;
pub mod drops;
pub mod events;
pub mod recovery;
