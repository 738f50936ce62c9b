//! Per-app usage in the scheduler's amounts (cpu, memory, disk space,
//! network, disk I/O rate), measured between two samples. The figures come
//! from the runtime through its one measuring function
//! ([`Runtime::app_usage`]); this module only converts units and turns the
//! socket byte counter into a rate.

use std::collections::BTreeMap;

use crate::clock::now_ms;
use crate::config::NetworkAccounting;
use crate::runtime::Runtime;
use crate::scheduler::Amounts;

/// Measures per-app usage between samples; keeps each app's last socket
/// byte count for the network rate.
#[derive(Debug, Default)]
pub struct Meter {
    net: BTreeMap<String, (u64, u64)>,
}

impl Meter {
    pub fn new() -> Self {
        Meter::default()
    }

    /// Every app with a process, in the scheduler's amounts. Network is
    /// measured per app only with [`NetworkAccounting::Process`] (0
    /// otherwise: the scheduler takes the interfaces' rate instead), and
    /// only from an app's second sample on.
    pub fn measure(
        &mut self,
        runtime: &Runtime,
        accounting: NetworkAccounting,
    ) -> BTreeMap<String, Amounts> {
        let per_process = accounting == NetworkAccounting::Process;
        let now = now_ms();
        let mut out = BTreeMap::new();
        for (name, u) in runtime.app_usage(per_process) {
            let mut kbps = 0;
            if per_process {
                if let Some((b0, t0)) = self.net.get(&name)
                    && now > *t0
                {
                    kbps = u.socket_bytes.saturating_sub(*b0) * 8 / (now - t0);
                }
                self.net.insert(name.clone(), (u.socket_bytes, now));
            }
            out.insert(
                name,
                [
                    u.cpu_millis,
                    u.memory_mb,
                    u.disk_bytes / (1024 * 1024),
                    kbps,
                    u.disk_io_bytes_per_sec / 1024,
                ],
            );
        }
        self.net.retain(|k, _| out.contains_key(k));
        out
    }
}
