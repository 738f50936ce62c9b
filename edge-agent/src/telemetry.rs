//! Resource measurement with sysinfo. Only what is reported is refreshed:
//! CPU usage, RAM, disk space and I/O counters, interface counters.
//!
//! Rates (disk read/write, network rx/tx) are the counter deltas since the
//! previous sample divided by the real elapsed time. Several agents on one
//! machine (dev mode, tests) see the same machine-wide counters; per-agent
//! network accounting arrives with the threshold scheduler.
//!
//! Measuring never holds up the stream: the `Measurer` task samples (on a
//! blocking thread) when the uplink asks, and the uplink sends each new
//! measurement when it is ready (`Measurements`), so heartbeats and other
//! stream traffic never wait for /proc or statvfs. Apart from the
//! machine-wide figures here, only the apps' own processes are read
//! (`runtime::usage`), never the whole process table.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgepool_common::proto as pb;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use sysinfo::{
    CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System,
};

use crate::config::CapacityConfig;
use crate::node::Shared;

// Re-exported: samples and the `Measure` trait speak in it.
pub use crate::resources::Resources;

const MIB: u64 = 1024 * 1024;
/// Link capacity assumed when no measured interface reports a speed
/// (common in VMs); set `capacity.network_mbps` to the real uplink.
pub const FALLBACK_LINK_MBPS: u64 = 1000;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskSample {
    pub mount_point: String,
    pub file_system: String,
    pub total_mb: u64,
    pub used_mb: u64,
    pub read_bytes_per_sec: u64,
    pub write_bytes_per_sec: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceSample {
    pub name: String,
    pub rx_bytes_per_sec: u64,
    pub tx_bytes_per_sec: u64,
    pub link_mbps: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub cpu_percent: f64,
    pub usage: Resources,
    pub disks: Vec<DiskSample>,
    pub interfaces: Vec<InterfaceSample>,
}

#[derive(Debug, thiserror::Error)]
#[error("sysinfo: {0}")]
pub struct TelemetryError(String);

pub struct Sampler {
    sys: System,
    disks: Disks,
    networks: Networks,
    last: Instant,
    interfaces: Vec<String>,
    overrides: CapacityConfig,
    capacity: Resources,
}

impl Sampler {
    /// `interfaces` empty = every interface except loopback.
    pub fn new(interfaces: Vec<String>, overrides: CapacityConfig) -> Result<Self, TelemetryError> {
        let err = |e: sysinfo::Error| TelemetryError(e.to_string());
        let mut sys = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        )
        .map_err(err)?;
        sys.refresh_cpu_usage();
        let disks = Disks::new_with_refreshed_list_specifics(
            DiskRefreshKind::nothing().with_storage().with_io_usage(),
        )
        .map_err(err)?;
        let networks = Networks::new_with_refreshed_list().map_err(err)?;
        let mut sampler = Sampler {
            sys,
            disks,
            networks,
            last: Instant::now(),
            interfaces,
            overrides,
            capacity: Resources::default(),
        };
        sampler.capacity = sampler.detect_capacity();
        Ok(sampler)
    }

    pub fn capacity(&self) -> Resources {
        self.capacity
    }

    fn measured_interface(&self, name: &str) -> bool {
        if self.interfaces.is_empty() {
            name != "lo"
        } else {
            self.interfaces.iter().any(|i| i == name)
        }
    }

    fn detect_capacity(&self) -> Resources {
        let pick = |over: u64, detected: u64| if over > 0 { over } else { detected };
        let cpu = self.sys.cpus().len().max(1) as u64 * 1000;
        let memory = self.sys.total_memory() / MIB;
        let disk = self.real_disks().map(|d| d.total_space() / MIB).sum();
        let link_bits: u64 = self
            .networks
            .iter()
            .filter(|(name, _)| self.measured_interface(&name.to_string_lossy()))
            .filter_map(|(_, n)| n.transmit_link_speed())
            .sum();
        let mut network = link_bits / 1_000_000;
        if network == 0 && self.overrides.network_mbps == 0 {
            tracing::info!(
                "no link speed reported for the measured interfaces; assuming {FALLBACK_LINK_MBPS} Mbit/s (set capacity.network_mbps)"
            );
            network = FALLBACK_LINK_MBPS;
        }
        Resources {
            cpu_millis: pick(self.overrides.cpu_millis, cpu),
            memory_mb: pick(self.overrides.memory_mb, memory),
            disk_mb: pick(self.overrides.disk_mb, disk),
            network_mbps: pick(self.overrides.network_mbps, network),
            // Not detected: only the configured value.
            disk_io_kbps: self.overrides.disk_io_kbps,
        }
    }

    /// File systems with space, one mount per device (bind mounts of the
    /// same device would otherwise count twice).
    fn real_disks(&self) -> impl Iterator<Item = &sysinfo::Disk> {
        let mut seen = HashSet::new();
        self.disks
            .iter()
            .filter(|d| d.total_space() > 0)
            .filter(move |d| seen.insert(d.name().to_os_string()))
    }

    /// Refreshes the counters and returns one sample.
    pub fn sample(&mut self) -> Sample {
        self.sys.refresh_cpu_usage();
        self.sys
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        self.disks.refresh_specifics(
            true,
            DiskRefreshKind::nothing().with_storage().with_io_usage(),
        );
        self.networks.refresh(true);
        let elapsed = self.last.elapsed().as_secs_f64().max(0.001);
        self.last = Instant::now();
        let rate = |bytes: u64| (bytes as f64 / elapsed).round() as u64;

        let cpu_percent = f64::from(self.sys.global_cpu_usage()).clamp(0.0, 100.0);
        let disks: Vec<DiskSample> = self
            .real_disks()
            .map(|d| {
                let io = d.usage();
                DiskSample {
                    mount_point: d.mount_point().display().to_string(),
                    file_system: d.file_system().to_string_lossy().into_owned(),
                    total_mb: d.total_space() / MIB,
                    used_mb: d.total_space().saturating_sub(d.available_space()) / MIB,
                    read_bytes_per_sec: rate(io.read_bytes),
                    write_bytes_per_sec: rate(io.written_bytes),
                }
            })
            .collect();
        let interfaces: Vec<InterfaceSample> = self
            .networks
            .iter()
            .filter(|(name, _)| self.measured_interface(&name.to_string_lossy()))
            .map(|(name, n)| InterfaceSample {
                name: name.to_string_lossy().into_owned(),
                rx_bytes_per_sec: rate(n.received()),
                tx_bytes_per_sec: rate(n.transmitted()),
                link_mbps: n.transmit_link_speed().unwrap_or(0) / 1_000_000,
            })
            .collect();
        let net_bytes: u64 = interfaces
            .iter()
            .map(|i| i.rx_bytes_per_sec + i.tx_bytes_per_sec)
            .sum();
        let usage = Resources {
            cpu_millis: ((cpu_percent / 100.0) * self.capacity.cpu_millis as f64).round() as u64,
            memory_mb: self.sys.used_memory() / MIB,
            disk_mb: disks.iter().map(|d| d.used_mb).sum(),
            network_mbps: net_bytes * 8 / 1_000_000,
            disk_io_kbps: disks
                .iter()
                .map(|d| d.read_bytes_per_sec + d.write_bytes_per_sec)
                .sum::<u64>()
                / 1024,
        };
        Sample {
            cpu_percent,
            usage,
            disks,
            interfaces,
        }
    }
}

/// Where measurements come from: this machine ([`Sampler`]) or, for the
/// virtual agents of `edgepool-swarm`, a simulated one.
pub trait Measure: Send + 'static {
    /// What the machine has (reported in the hello).
    fn capacity(&self) -> Resources;
    /// Takes one sample.
    fn sample(&mut self) -> Sample;
    /// Whether `sample` blocks (reads /proc, calls statvfs); if so it runs
    /// on a blocking thread, with the app report.
    fn blocks(&self) -> bool {
        true
    }
}

impl Measure for Sampler {
    fn capacity(&self) -> Resources {
        Sampler::capacity(self)
    }

    fn sample(&mut self) -> Sample {
        Sampler::sample(self)
    }
}

/// One measurement: the machine sample and the app report built with it.
#[derive(Debug)]
pub struct Measured {
    pub sample: Sample,
    pub report: pb::AppReport,
}

/// The uplink's side of the measuring task.
pub struct Measurements {
    ask: Arc<Notify>,
    latest: watch::Receiver<Option<Arc<Measured>>>,
}

impl Measurements {
    /// Asks for a fresh measurement; never waits. Requests made while one
    /// is running are folded into one more.
    pub fn request(&self) {
        self.ask.notify_one();
    }

    /// A handle that asks for a measurement from elsewhere (the apply
    /// worker, once a new assignment has started or stopped apps).
    pub fn asker(&self) -> Arc<Notify> {
        self.ask.clone()
    }

    /// A reader of the newest measurement, apart from this handle's own
    /// (the metrics read the apps' figures from it at scrape time).
    pub fn reader(&self) -> watch::Receiver<Option<Arc<Measured>>> {
        self.latest.clone()
    }

    /// The next new measurement (None once the measuring task is gone).
    pub async fn next(&mut self) -> Option<Arc<Measured>> {
        self.latest.changed().await.ok()?;
        self.latest.borrow_and_update().clone()
    }
}

/// The measuring task: samples the machine and builds the app report on a
/// blocking thread whenever asked, and publishes the result.
pub struct Measurer {
    sampler: Box<dyn Measure>,
    shared: Arc<Shared>,
    ask: Arc<Notify>,
    latest: watch::Sender<Option<Arc<Measured>>>,
    /// Extra time per measurement (fault injection, see `FAULT_ENV`).
    slow: Option<Duration>,
}

/// `EDGEPOOL_FAULT=slow-sampling` makes every measurement take 4 s longer
/// (used by the test that heartbeats never wait for sampling).
const FAULT_ENV: &str = "EDGEPOOL_FAULT";

/// A measuring task (to `run`) and the handle that asks it and reads it.
pub fn measurer(sampler: Box<dyn Measure>, shared: Arc<Shared>) -> (Measurer, Measurements) {
    let ask = Arc::new(Notify::new());
    let (latest, rx) = watch::channel(None);
    let task = Measurer {
        sampler,
        shared,
        ask: ask.clone(),
        latest,
        slow: (std::env::var(FAULT_ENV).as_deref() == Ok("slow-sampling"))
            .then_some(Duration::from_secs(4)),
    };
    (task, Measurements { ask, latest: rx })
}

impl Measurer {
    /// Runs until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        let Measurer {
            mut sampler,
            shared,
            ask,
            latest,
            slow,
        } = self;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ask.notified() => {}
            }
            let (back, sample, report) = if sampler.blocks() || slow.is_some() {
                let sh = shared.clone();
                // sysinfo reads /proc and calls statvfs, the report reads
                // the apps' /proc entries: blocking work, off the async
                // threads.
                let done = tokio::task::spawn_blocking(move || {
                    if let Some(extra) = slow {
                        std::thread::sleep(extra);
                    }
                    let sample = sampler.sample();
                    let report = sh.report();
                    (sampler, sample, report)
                })
                .await;
                match done {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::error!(error = %e, "measuring failed; no more telemetry");
                        return;
                    }
                }
            } else {
                // A simulated machine and runtime: nothing to wait for.
                let sample = sampler.sample();
                let report = shared.report();
                (sampler, sample, report)
            };
            sampler = back;
            shared.set_usage(sample.usage);
            let bytes: u64 = sample
                .interfaces
                .iter()
                .map(|i| i.rx_bytes_per_sec + i.tx_bytes_per_sec)
                .sum();
            shared.set_interface_kbps(bytes * 8 / 1000);
            latest.send_replace(Some(Arc::new(Measured { sample, report })));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_machine_numbers_are_sane() {
        let mut s = Sampler::new(Vec::new(), CapacityConfig::default()).unwrap();
        let cap = s.capacity();
        assert!(cap.cpu_millis >= 1000);
        assert!(cap.memory_mb > 0);
        assert!(cap.disk_mb > 0, "no disk detected");
        assert!(cap.network_mbps > 0);
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let sample = s.sample();
        assert!((0.0..=100.0).contains(&sample.cpu_percent));
        assert!(sample.usage.cpu_millis <= cap.cpu_millis);
        assert!(sample.usage.memory_mb > 0 && sample.usage.memory_mb <= cap.memory_mb);
        assert!(sample.usage.disk_mb <= cap.disk_mb);
    }

    #[test]
    fn overrides_win_over_detection() {
        let over = CapacityConfig {
            cpu_millis: 500,
            memory_mb: 64,
            disk_mb: 10,
            network_mbps: 7,
            disk_io_kbps: 4096,
        };
        let s = Sampler::new(vec!["nonexistent0".into()], over).unwrap();
        assert_eq!(
            s.capacity(),
            Resources {
                cpu_millis: 500,
                memory_mb: 64,
                disk_mb: 10,
                network_mbps: 7,
                disk_io_kbps: 4096,
            }
        );
    }
}
