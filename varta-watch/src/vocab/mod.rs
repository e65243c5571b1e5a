//! The shared vocabulary, below every stage: what the stages hand each other (drop
//! counters, events).

pub mod drops;
pub mod events;
