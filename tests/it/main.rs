//! Whole-system tests, one binary with a module per suite.
mod canonical;
mod cluster;
mod tls;
