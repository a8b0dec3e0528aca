//! propd-merkle (being built; see docs/ARCHITECTURE.md).
