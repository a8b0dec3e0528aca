//! The receiver of a `BulkSync` stream (protocol versions 2 and 3) fed a hostile one
//! (`propd_fuzz::bulk`): pages and properties out of key order, keys outside the listed nodes,
//! oversize pages, forged, damaged and arbitrary messages. No panic, every bad page a typed
//! error that changes nothing, no copy going back or invented, and a merely reordered stream
//! still converging.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: propd_fuzz::bulk::BulkInput| {
    propd_fuzz::bulk::run_bulk(input);
});
