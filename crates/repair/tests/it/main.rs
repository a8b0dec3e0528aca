//! Integration tests of the repair protocol: scenarios, convergence, bad input, tonic.

mod bulk;
mod convergence;
mod interrupted;
mod lifecycle;
mod malformed;
mod scenarios;
mod support;
#[cfg(feature = "transport")]
mod transport;
mod versions;
