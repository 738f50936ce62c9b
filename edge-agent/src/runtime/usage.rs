//! Per-app resource use, read from /proc for the apps' own processes only.
//!
//! Each app is the tree rooted at its process (the leader of its process
//! group): the root and its descendants, found through
//! `/proc/<pid>/task/<tid>/children`, so a refresh reads a few files per app
//! process and never walks the machine's process table. (Only a kernel
//! without `CONFIG_PROC_CHILDREN` makes it fall back to one pass over
//! /proc for the parent links.) Per process: CPU time and resident memory
//! from `/proc/<pid>/stat`, storage I/O from `/proc/<pid>/io`.
//!
//! Rates (CPU, disk read/write) are counter deltas of processes seen in the
//! previous refresh too (same pid and start time), divided by the real
//! time between the refreshes; a process seen for the first time counts
//! from the next refresh on.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::{AppUsage, USAGE_MIN_INTERVAL};

const MIB: u64 = 1024 * 1024;
/// Safety bound on one app's tree (a fork bomb must not make a refresh
/// unbounded).
const MAX_TREE: usize = 4096;

/// Counters of one process at one refresh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    start_time: u64,
    /// utime + stime, clock ticks.
    cpu_ticks: u64,
    rss_bytes: u64,
    read_bytes: u64,
    write_bytes: u64,
    /// Number of threads (field 20).
    threads: u64,
}

pub(super) struct Sampler {
    last: Option<Instant>,
    /// Counters per pid from the last refresh.
    prev: HashMap<u32, Counters>,
    /// Usage per app root pid, from the last refresh.
    cached: HashMap<u32, AppUsage>,
    ticks_per_sec: f64,
    page_size: u64,
    links: ChildLinks,
}

impl Sampler {
    pub(super) fn new() -> Self {
        use nix::unistd::{SysconfVar, sysconf};
        let conf = |v, default: i64| {
            sysconf(v)
                .ok()
                .flatten()
                .filter(|n| *n > 0)
                .unwrap_or(default)
        };
        Sampler {
            last: None,
            prev: HashMap::new(),
            cached: HashMap::new(),
            ticks_per_sec: conf(SysconfVar::CLK_TCK, 100) as f64,
            page_size: conf(SysconfVar::PAGE_SIZE, 4096) as u64,
            links: ChildLinks::default(),
        }
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
        // The first refresh has no previous counters to take a rate from.
        let seconds = self
            .last
            .map(|last| now.duration_since(last).as_secs_f64())
            .filter(|s| *s > 0.0);
        self.last = Some(now);
        let mut next = HashMap::new();
        let mut cached = HashMap::new();
        for root in roots {
            let mut usage = Usage::default();
            for (pid, now_c) in self.read_tree(*root) {
                let Some(now_c) = now_c else {
                    continue;
                };
                usage.memory = usage.memory.saturating_add(now_c.rss_bytes);
                if let Some(before) = self
                    .prev
                    .get(&pid)
                    .filter(|b| b.start_time == now_c.start_time)
                {
                    usage.ticks += now_c.cpu_ticks.saturating_sub(before.cpu_ticks);
                    usage.read += now_c.read_bytes.saturating_sub(before.read_bytes);
                    usage.written += now_c.write_bytes.saturating_sub(before.write_bytes);
                }
                next.insert(pid, now_c);
            }
            cached.insert(*root, usage.finish(seconds, self.ticks_per_sec));
        }
        self.prev = next;
        self.cached = cached;
    }
}

impl Sampler {
    /// The counters of `root` and its descendants. Each process's stat is
    /// read before its children are looked up: a process with one thread
    /// has a single `children` file to read.
    fn read_tree(&mut self, root: u32) -> Vec<(u32, Option<Counters>)> {
        let page_size = self.page_size;
        if self.links.files != Some(false) {
            let mut out = Vec::new();
            let links = &mut self.links;
            tree_from(root, |pid| {
                let c = read_counters(pid, page_size);
                let kids = links.children_hinted(pid, c.map(|c| c.threads));
                out.push((pid, c));
                kids
            });
            if self.links.files != Some(false) {
                return out;
            }
        }
        self.links
            .tree(root)
            .into_iter()
            .map(|pid| (pid, read_counters(pid, page_size)))
            .collect()
    }
}

/// `root` and its descendants (at most `MAX_TREE`), found the same way as
/// for usage: without walking the whole process table when the kernel has
/// `/proc/<pid>/task/<tid>/children`. For per-app figures outside the
/// runtime (an app's socket I/O, for example).
pub fn process_tree(root: u32) -> Vec<u32> {
    ChildLinks::default().tree(root)
}

/// How children are found: `/proc/<pid>/task/<tid>/children`, or one scan
/// of /proc for the parent links on kernels without those files.
#[derive(Debug, Default)]
struct ChildLinks {
    /// None until known; false: the kernel has no children files.
    files: Option<bool>,
}

impl ChildLinks {
    fn tree(&mut self, root: u32) -> Vec<u32> {
        if self.files == Some(false) {
            let parents = scan_children();
            return tree_from(root, |pid| parents.get(&pid).cloned().unwrap_or_default());
        }
        let pids = tree_from(root, |pid| self.children(pid));
        if self.files == Some(false) {
            // Found out on the way: walk again with the fallback.
            return self.tree(root);
        }
        pids
    }

    /// Direct children of `pid`, which has `threads` threads if known.
    fn children_hinted(&mut self, pid: u32, threads: Option<u64>) -> Vec<u32> {
        if threads == Some(1) && self.files == Some(true) {
            // Its only task is itself.
            return std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .map(|text| {
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok())
                        .collect()
                })
                .unwrap_or_default();
        }
        self.children(pid)
    }

    /// Direct children of `pid` (every thread's `children` file).
    fn children(&mut self, pid: u32) -> Vec<u32> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for tid in tasks.filter_map(|t| t.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
            match std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")) {
                Ok(text) => {
                    self.files = Some(true);
                    out.extend(
                        text.split_whitespace()
                            .filter_map(|p| p.parse::<u32>().ok()),
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.files.is_none() => {
                    // The task exists but has no children file: the kernel
                    // lacks CONFIG_PROC_CHILDREN (unless the task just ended).
                    if std::fs::metadata(format!("/proc/{pid}/task/{tid}")).is_ok() {
                        tracing::info!(
                            "/proc/<pid>/task/<tid>/children is missing: app processes are found by scanning /proc"
                        );
                        self.files = Some(false);
                    }
                }
                Err(_) => {}
            }
        }
        out
    }
}

#[derive(Default)]
struct Usage {
    ticks: u64,
    memory: u64,
    read: u64,
    written: u64,
}

impl Usage {
    fn finish(&self, seconds: Option<f64>, ticks_per_sec: f64) -> AppUsage {
        let rate = |v: u64| seconds.map_or(0.0, |s| v as f64 / s);
        AppUsage {
            // Millicores: thousandths of one core.
            cpu_millis: (rate(self.ticks) / ticks_per_sec * 1000.0).round() as u64,
            memory_mb: self.memory / MIB,
            disk_read_bytes_per_sec: rate(self.read) as u64,
            disk_write_bytes_per_sec: rate(self.written) as u64,
        }
    }
}

/// `root` and its descendants, each once, at most `MAX_TREE`.
fn tree_from(root: u32, mut children: impl FnMut(u32) -> Vec<u32>) -> Vec<u32> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        if out.len() >= MAX_TREE {
            break;
        }
        if !seen.insert(pid) {
            continue;
        }
        out.push(pid);
        todo.extend(children(pid));
    }
    out
}

/// Parent -> children over the whole /proc (fallback only).
fn scan_children() -> HashMap<u32, Vec<u32>> {
    let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return map;
    };
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        if let Some(ppid) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| stat_fields(&s)?.get(1)?.parse::<u32>().ok())
        {
            map.entry(ppid).or_default().push(pid);
        }
    }
    map
}

/// The fields after the command name: `fields[n - 3]` is field n of
/// proc(5) (the name may contain spaces and parentheses).
fn stat_fields(text: &str) -> Option<Vec<&str>> {
    Some(text.rsplit_once(')')?.1.split_whitespace().collect())
}

fn read_counters(pid: u32, page_size: u64) -> Option<Counters> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut c = parse_stat_counters(&stat, page_size)?;
    // Unreadable (another user's process) or absent: no I/O figures.
    if let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) {
        let (read, write) = parse_io(&io);
        c.read_bytes = read;
        c.write_bytes = write;
    }
    Some(c)
}

/// CPU ticks (utime 14 + stime 15), threads (20), start time (22) and RSS
/// (24, pages) of a live process; None for a zombie or an unparsable line.
fn parse_stat_counters(text: &str, page_size: u64) -> Option<Counters> {
    let f = stat_fields(text)?;
    if matches!(f.first()?.chars().next()?, 'Z' | 'X' | 'x') {
        return None;
    }
    let n = |i: usize| f.get(i - 3)?.parse::<u64>().ok();
    Some(Counters {
        start_time: n(22)?,
        cpu_ticks: n(14)? + n(15)?,
        rss_bytes: n(24)?.saturating_mul(page_size),
        read_bytes: 0,
        write_bytes: 0,
        threads: n(20)?,
    })
}

/// `read_bytes` and `write_bytes` (bytes that went to storage).
fn parse_io(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("read_bytes:"), field("write_bytes:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_counters_and_io() {
        let text = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 17 25 0 0 20 0 1 0 \
                    987654 1000 300 18446744073709551615";
        let c = parse_stat_counters(text, 4096).unwrap();
        assert_eq!(
            c,
            Counters {
                start_time: 987654,
                cpu_ticks: 42,
                rss_bytes: 300 * 4096,
                read_bytes: 0,
                write_bytes: 0,
                threads: 1,
            }
        );
        let zombie = text.replace(") S ", ") Z ");
        assert!(parse_stat_counters(&zombie, 4096).is_none());
        let io = "rchar: 10\nwchar: 20\nsyscr: 1\nsyscw: 2\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(parse_io(io), (4096, 8192));
    }

    #[test]
    fn trees_are_walked_once_and_bounded() {
        let kids = |pid: u32| match pid {
            1 => vec![2, 3],
            2 => vec![4, 1],
            _ => vec![],
        };
        let mut t = tree_from(1, kids);
        t.sort();
        assert_eq!(t, vec![1, 2, 3, 4]);
        let endless = tree_from(1, |pid| vec![pid + 1]);
        assert_eq!(endless.len(), MAX_TREE);
    }

    #[test]
    fn children_of_single_threaded_processes_are_found() {
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()
            .unwrap();
        let root = shell.id();
        let mut s = Sampler::new();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let mut found = Vec::new();
        while Instant::now() < deadline {
            found = s.read_tree(root).into_iter().map(|(pid, _)| pid).collect();
            if found.len() == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(root as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        for pid in found.iter().skip(1) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = shell.wait();
        assert_eq!(found.len(), 3, "the shell and its two sleeps: {found:?}");
    }

    #[test]
    fn own_tree_is_measured_without_scanning_proc() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let mut s = Sampler::new();
        let first = s.usage(&[me]);
        assert!(first[&me].memory_mb > 0, "{first:?}");
        assert_eq!(s.links.files, Some(true), "kernel without children files?");
        assert!(process_tree(me).contains(&child.id()));
        // The child is part of our tree.
        assert!(s.prev.contains_key(&child.id()));
        let _ = child.kill();
        let _ = child.wait();
    }
}
