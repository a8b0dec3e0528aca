//! propd-store (being built; see docs/ARCHITECTURE.md).
