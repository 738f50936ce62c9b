//! Reading /proc/<pid>/stat.

use nix::errno::Errno;
use nix::sys::signal::killpg;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Stat {
    pub state: char,
    pub pgrp: i32,
    pub start_time: u64,
}

impl Stat {
    /// Zombies still count for kill(2) but are already dead.
    pub(super) fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

pub(super) fn parse_stat(text: &str) -> Option<Stat> {
    // Field 2, the command name, may contain spaces and parentheses, so
    // fields are counted from the last ')': field n is fields[n - 3].
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

pub(super) fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// True while `pid` is the process that started at `start_time`.
pub(super) fn is_alive(pid: u32, start_time: u64) -> bool {
    stat(pid).is_some_and(|s| s.start_time == start_time && !s.is_dead())
}

/// True while a live (non-zombie) process is in the group.
pub(super) fn group_alive(pgid: u32) -> bool {
    let Some(target) = super::group_target(pgid) else {
        return false;
    };
    if killpg(target, None) == Err(Errno::ESRCH) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat)
        .any(|s| s.pgrp == target.as_raw() && !s.is_dead())
}
