//! The manager's and the agent's TOML config files, parsed and validated.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cloud_manager::fuzzing::config(data);
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = edge_agent::config::AgentConfig::from_toml(&text) {
        let _ = c.validate();
    }
});
