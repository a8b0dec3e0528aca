//! The `propd` binary (being built; see docs/ARCHITECTURE.md).

fn main() {}
