//! propd-repair (being built; see docs/ARCHITECTURE.md).
