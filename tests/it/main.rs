//! Whole-system tests, one binary with a module per suite.
mod canonical;
mod cluster;
mod deletes;
mod faults;
mod membership;
mod operator;
mod operator_cli;
mod pages;
mod tls;
