//! PeerService requests as a member receives them, and the assignment a
//! member parses its membership from.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edge_agent::fuzzing::peer_request(data);
});
