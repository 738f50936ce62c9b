//! AgentService.Connect: a hello, then any messages, through the
//! manager's per-message handling (`cloud_manager::fuzzing`).
#![no_main]
use std::sync::LazyLock;

use cloud_manager::fuzzing::Harness;
use libfuzzer_sys::fuzz_target;

static HARNESS: LazyLock<Harness> = LazyLock::new(Harness::new);

fuzz_target!(|data: &[u8]| {
    HARNESS.agent_stream(data);
});
