//! The nemesis suite (issue 12): real `propd serve` processes behind a fault-injecting proxy,
//! a workload of concurrent clients recording a history, a seeded schedule of faults, and a
//! checker that reads every copy at the end and proves nothing acknowledged was lost and nothing
//! deleted came back. `cargo xtask nemesis` runs it; `docs/reliability.md` describes it.

pub mod checker;
pub mod cluster;
pub mod copies;
pub mod corrupt;
pub mod history;
pub mod proxy;
pub mod rng;
pub mod run;
pub mod schedule;
pub mod workload;
