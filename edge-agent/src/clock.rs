//! The wall clock in milliseconds since the Unix epoch, the time base of
//! leases, offload records and peer probes. A leaf: imports nothing from
//! the crate.

/// Now, in milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
