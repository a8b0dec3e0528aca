//! `nemesis`: run by `cargo xtask nemesis`.
fn main() {}
