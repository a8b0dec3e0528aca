//! propd-gossip (being built; see docs/ARCHITECTURE.md).
