//! propd's wire contract, generated from `proto/propd/v1/*.proto`.
//!
//! Without features this crate holds only the prost messages, so pure crates
//! can name them without pulling in tonic; the `transport` feature adds the
//! tonic clients and servers. It does not convert to domain types: each
//! crate that crosses the wire edge owns those conversions. With `transport`
//! it also holds `peer`, the one rule for telling an unreachable peer from a
//! peer that answered with an error, and `FILE_DESCRIPTOR_SET`, the
//! descriptors a server needs for gRPC reflection.

/// Version 1 of the propd API.
#[allow(missing_docs, unreachable_pub, unused_qualifications)]
#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/propd.v1.rs"));
}

/// The largest gRPC message either side accepts (4 MiB would be tonic's
/// default; ours is explicit so that pages are sized against it).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

#[cfg(feature = "transport")]
pub mod peer;

/// The encoded `FileDescriptorSet` of every propd proto file, as gRPC server
/// reflection serves it (`grpcurl` lists and calls the services without the
/// `.proto` files).
#[cfg(feature = "transport")]
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/propd_descriptor_set.bin"));
