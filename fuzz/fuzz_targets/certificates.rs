//! Certificate, CSR, PEM, SPIFFE URI and serial parsing.
#![no_main]
use std::sync::LazyLock;

use cloud_manager::ca::Ca;
use libfuzzer_sys::fuzz_target;

static CA: LazyLock<Ca> = LazyLock::new(|| Ca::generate("edgepool.local").expect("CA"));

fuzz_target!(|data: &[u8]| {
    cloud_manager::fuzzing::certificates(&CA, data);
});
