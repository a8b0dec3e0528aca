//! The two-node repair protocol of propd (DESIGN §7): a client and a server state machine that
//! find the properties two copies of one (group, shard) disagree on, by descending their Merkle
//! trees only where digests differ, and exchange exactly those properties, the newer version
//! winning (DESIGN §3).
//!
//! The core is pure: [`Client`] and [`Server`] take messages and return messages, read the store
//! through `propd_merkle::RepairStore` (which the node's store implements; this crate links no
//! database), and own no socket, task or clock. [`pair::Pair`] drives both in memory,
//! deterministically. The tonic driver (`transport` module, cargo feature `transport`) moves the
//! same messages over one bidirectional gRPC stream.
//!
//! The protocol, message by message, and its bandwidth are described in `docs/protocol.md`
//! ("Two-node sync").
//!
//! What this crate does not do: it does not choose whom to sync with or when (that is
//! `propd-gossip` and the node's schedulers), it does not store anything itself (every read and
//! write goes through the store's repair trait, one write transaction per received page), and
//! without the `transport` feature it depends on no async runtime.

mod common;
mod config;
mod descent;
mod error;
mod store_api;
mod wire;

pub mod client;
pub mod pair;
pub mod report;
pub mod server;
#[cfg(feature = "transport")]
pub mod transport;

pub use client::Client;
pub use config::Config;
pub use error::{Disposition, PropertyError, ProtocolError, SyncError};
pub use report::{LevelTraffic, ServerReport, SyncReport};
pub use server::Server;
pub use wire::{
    FINGERPRINT_BYTES, MAX_PAGE_ITEMS, PROTOCOL_VERSION, property_from_proto, property_to_proto,
    shape_from_proto, shape_to_proto,
};
