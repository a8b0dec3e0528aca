//! The repair server fed a real client's messages, dropped, repeated, corrupted, cut or
//! interleaved with forged ones (`propd_fuzz::run_server`): no panic, every bad message a typed
//! error that fails the sync, and an untouched conversation ends with equal copies.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: propd_fuzz::Input<propd_fuzz::Request>| {
    propd_fuzz::run_server(input);
});
