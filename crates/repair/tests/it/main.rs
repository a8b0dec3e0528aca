//! Integration tests of the repair protocol: scenarios, convergence, bad input, tonic.

mod convergence;
mod interrupted;
mod malformed;
mod scenarios;
mod support;
#[cfg(feature = "transport")]
mod transport;
