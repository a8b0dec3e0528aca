//! The repair client fed a real server's messages, dropped, repeated, corrupted, cut or
//! interleaved with forged ones (`propd_fuzz::run_client`): no panic, every bad message a typed
//! error that fails the sync, and an untouched conversation ends with equal copies.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: propd_fuzz::Input<propd_fuzz::Response>| {
    propd_fuzz::run_client(input);
});
