//! Integration tests of propd-store: one binary, a module per suite.
