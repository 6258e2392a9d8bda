//! `cargo +nightly fuzz run admission`: admission and token parsing never panic and never answer
//! a 5xx other than the 503 of the (deliberately absent) bus. See `../harness.rs`.

#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
