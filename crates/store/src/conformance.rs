//! The conformance suite every `RepairStore` implementation must pass (being written).
