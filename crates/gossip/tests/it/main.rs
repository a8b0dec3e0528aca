//! propd-gossip's integration tests: the in-memory router, the exhaustive convergence check,
//! progress reports to the origin, the reference's scenarios, and the same flows over real
//! tonic servers.

mod exhaustive;
mod progress;
mod router;
mod scenarios;
#[cfg(feature = "transport")]
mod transport;
