//! The simulated machine under each virtual agent: a fixed capacity and a
//! usage that wanders (a bounded random walk per resource), so the
//! manager's telemetry, `ListNodes` usage and the pools' thresholds see
//! numbers that move, without reading /proc 10,000 times a second.

use edge_agent::telemetry::{DiskSample, InterfaceSample, Measure, Resources, Sample};

/// What every virtual machine has.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub network_mbps: u64,
}

pub struct Synthetic {
    capacity: Capacity,
    /// Current use as fractions of capacity: cpu, memory, disk, network.
    level: [f64; 4],
    rng: u64,
}

impl Synthetic {
    /// `seed` makes each virtual machine wander differently.
    pub fn new(capacity: Capacity, seed: u64) -> Self {
        let mut s = Synthetic {
            capacity,
            level: [0.10, 0.30, 0.20, 0.02],
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        };
        // Different starting points, so the fleet is not one number.
        for i in 0..4 {
            s.level[i] = (s.level[i] + 0.1 * s.uniform()).min(0.9);
        }
        s
    }

    /// xorshift64*: deterministic per seed, no dependency, plenty for noise.
    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Measure for Synthetic {
    fn capacity(&self) -> Resources {
        let c = self.capacity;
        Resources {
            cpu_millis: c.cpu_millis,
            memory_mb: c.memory_mb,
            disk_mb: c.disk_mb,
            network_mbps: c.network_mbps,
            disk_io_kbps: 0,
        }
    }

    fn sample(&mut self) -> Sample {
        for i in 0..4 {
            let step = (self.uniform() - 0.5) * 0.04;
            self.level[i] = (self.level[i] + step).clamp(0.01, 0.95);
        }
        let c = self.capacity;
        let of = |cap: u64, level: f64| (cap as f64 * level).round() as u64;
        let net_bytes = of(c.network_mbps * 125_000, self.level[3]);
        let disk_used = of(c.disk_mb, self.level[2]);
        Sample {
            cpu_percent: self.level[0] * 100.0,
            usage: Resources {
                cpu_millis: of(c.cpu_millis, self.level[0]),
                memory_mb: of(c.memory_mb, self.level[1]),
                disk_mb: disk_used,
                network_mbps: net_bytes * 8 / 1_000_000,
                disk_io_kbps: 0,
            },
            disks: vec![DiskSample {
                mount_point: "/".into(),
                file_system: "simfs".into(),
                total_mb: c.disk_mb,
                used_mb: disk_used,
                read_bytes_per_sec: 0,
                write_bytes_per_sec: 0,
            }],
            interfaces: vec![InterfaceSample {
                name: "sim0".into(),
                rx_bytes_per_sec: net_bytes / 2,
                tx_bytes_per_sec: net_bytes - net_bytes / 2,
                link_mbps: c.network_mbps,
            }],
        }
    }

    fn blocks(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_stays_within_capacity_and_moves() {
        let cap = Capacity {
            cpu_millis: 4000,
            memory_mb: 8192,
            disk_mb: 100_000,
            network_mbps: 1000,
        };
        let mut m = Synthetic::new(cap, 7);
        let first = m.sample();
        let mut moved = false;
        for _ in 0..100 {
            let s = m.sample();
            assert!(s.usage.cpu_millis <= cap.cpu_millis);
            assert!(s.usage.memory_mb <= cap.memory_mb);
            assert!(s.usage.network_mbps <= cap.network_mbps);
            assert!((0.0..=100.0).contains(&s.cpu_percent));
            moved |= s.usage != first.usage;
        }
        assert!(moved);
    }
}
