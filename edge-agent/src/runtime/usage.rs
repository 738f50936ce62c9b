//! Per-app resource use with sysinfo.

use std::collections::HashMap;
use std::time::Instant;

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use super::{AppUsage, USAGE_MIN_INTERVAL};

const MIB: u64 = 1024 * 1024;

pub(super) struct Sampler {
    sys: System,
    last: Option<Instant>,
    /// Usage per app root pid, from the last refresh.
    cached: HashMap<u32, AppUsage>,
}

impl Sampler {
    pub(super) fn new() -> Result<Self, sysinfo::Error> {
        Ok(Sampler {
            sys: System::new()?,
            last: None,
            cached: HashMap::new(),
        })
    }

    /// Usage of the process trees rooted at `roots`.
    pub(super) fn usage(&mut self, roots: &[u32]) -> HashMap<u32, AppUsage> {
        let now = Instant::now();
        if self
            .last
            .is_none_or(|last| now.duration_since(last) >= USAGE_MIN_INTERVAL)
        {
            self.refresh(roots, now);
        }
        roots
            .iter()
            .map(|root| (*root, self.cached.get(root).copied().unwrap_or_default()))
            .collect()
    }

    fn refresh(&mut self, roots: &[u32], now: Instant) {
        // Threads are left out: they share their process's memory and
        // their CPU time is already in the process's.
        let kinds = ProcessRefreshKind::nothing()
            .with_cpu()
            .with_memory()
            .with_disk_usage()
            .without_tasks();
        self.sys
            .refresh_processes_specifics(ProcessesToUpdate::All, true, kinds);
        // The first refresh has no previous counters to take a rate from.
        let seconds = self.last.map(|last| now.duration_since(last).as_secs_f64());
        self.last = Some(now);
        let mut children: HashMap<Pid, Vec<Pid>> = HashMap::new();
        for (pid, process) in self.sys.processes() {
            if let Some(parent) = process.parent() {
                children.entry(parent).or_default().push(*pid);
            }
        }
        self.cached = roots
            .iter()
            .map(|root| (*root, self.tree_usage(*root, &children, seconds)))
            .collect();
    }

    /// Sums the root and all its descendants.
    fn tree_usage(
        &self,
        root: u32,
        children: &HashMap<Pid, Vec<Pid>>,
        seconds: Option<f64>,
    ) -> AppUsage {
        let (mut cpu_percent, mut memory, mut read, mut written) = (0f64, 0u64, 0u64, 0u64);
        let mut todo = vec![Pid::from_u32(root)];
        let mut seen = std::collections::HashSet::new();
        while let Some(pid) = todo.pop() {
            if !seen.insert(pid) {
                continue;
            }
            if let Some(process) = self.sys.process(pid) {
                cpu_percent += f64::from(process.cpu_usage());
                memory = memory.saturating_add(process.memory());
                let disk = process.disk_usage();
                read = read.saturating_add(disk.read_bytes);
                written = written.saturating_add(disk.written_bytes);
            }
            todo.extend(children.get(&pid).into_iter().flatten().copied());
        }
        let rate = |bytes: u64| match seconds {
            Some(s) if s > 0.0 => (bytes as f64 / s) as u64,
            _ => 0,
        };
        AppUsage {
            // sysinfo gives percent of one core; millicores are ten times that.
            cpu_millis: (cpu_percent * 10.0).round() as u64,
            memory_mb: memory / MIB,
            disk_read_bytes_per_sec: rate(read),
            disk_write_bytes_per_sec: rate(written),
        }
    }
}
