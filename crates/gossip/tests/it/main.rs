//! propd-gossip's integration tests: the in-memory router, the exhaustive convergence check,
//! the reference's scenarios, and the same flows over real tonic servers.

mod exhaustive;
mod router;
mod scenarios;
#[cfg(feature = "transport")]
mod transport;
