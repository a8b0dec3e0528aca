//! The propd node: it assembles the store, the gossip and the repair protocol into one server.
//!
//! It owns configuration (file, `PROPD_*` variables, flags), placement of shards on members,
//! the one gRPC server (property API, gossip, repair, admin, and the standard health and
//! reflection services), the coordinator with read repair and write-miss triggered repair, the
//! schedulers (repair rounds, verification, tombstone purge), the HTTP port (metrics, `/health`,
//! the status page), round traces exported over OTLP, and the `propd` command line.
//!
//! It does not implement protocol logic: propagation rules live in `propd-gossip`, the
//! two-node sync in `propd-repair`, the version order and the tree in `propd-store` and
//! `propd-merkle`. Here they are wired to sockets, clocks and tasks.

mod admin;
mod auth;
mod certs;
pub mod cli;
mod config;
mod convert;
mod coordinator;
mod http;
mod import;
mod membership;
mod metrics;
mod moves;
mod node;
mod pages;
mod peer_copies;
mod peers;
mod placement;
mod schedule;
mod server;
mod services;
mod status;
mod streams;
mod sync;
mod telemetry;
mod tls;
mod tombstones;
