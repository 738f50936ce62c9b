//! TenantService requests (and Enroll), through the handlers' conversions
//! and validation into the manager's domain code.
#![no_main]
use std::sync::LazyLock;

use cloud_manager::fuzzing::Harness;
use libfuzzer_sys::fuzz_target;

static HARNESS: LazyLock<Harness> = LazyLock::new(Harness::new);

fuzz_target!(|data: &[u8]| {
    HARNESS.tenant_request(data);
});
