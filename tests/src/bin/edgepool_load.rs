//! Load generator for tests: consumes a requested amount of CPU, memory,
//! disk space, disk I/O and (loopback) network so resource thresholds can
//! be triggered for real.
//!
//!   edgepool-load [--cpu MILLIS] [--memory MB] [--disk MB] [--disk-io KBPS]
//!                 [--net KBPS] [--seconds N]
//!
//! It runs until killed, or for `--seconds N`. See `USAGE` for details.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::UdpSocket;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
const KIB: u64 = 1024;
const PAGE: usize = 4096;
/// Duty-cycle and pacing period.
const PERIOD: Duration = Duration::from_millis(10);
/// File written by `--disk`.
const DISK_FILE: &str = "load.dat";
/// File rewritten by `--disk-io`.
const DISK_IO_FILE: &str = "load-io.dat";
/// Destination of `--net` traffic: the discard port on loopback.
const NET_DEST: &str = "127.0.0.1:9";
/// Size of one `--net` datagram.
const DATAGRAM: usize = 1024;

const USAGE: &str = "\
edgepool-load: consume resources so tests can trigger resource thresholds

Usage: edgepool-load [--cpu MILLIS] [--memory MB] [--disk MB] [--disk-io KBPS]
                     [--net KBPS] [--seconds N]

  --cpu MILLIS     burn MILLIS millicores (1000 = one full core): one busy
                   thread per full 1000, plus one thread busy remainder/1000
                   of every 10 ms period
  --memory MB      allocate MB MiB, touch every page so it is resident, and
                   re-touch it every second so it stays resident
  --disk MB        write MB MiB to ./load.dat (1 MiB chunks, fsync at the end)
                   and keep the file (it is not deleted)
  --disk-io KBPS   continuously rewrite the side file ./load-io.dat (2 s of
                   writes, at least 1 MiB; kept) at about KBPS KiB/s, with
                   fdatasync every second, so write_bytes in /proc/<pid>/io
                   grows by about KBPS KiB/s
  --net KBPS       send about KBPS KiB/s of 1 KiB UDP datagrams to
                   127.0.0.1:9 (paced every 10 ms) with write(2) on a
                   connected socket, so /proc/<pid>/io wchar grows by about
                   KBPS KiB/s; send errors (ECONNREFUSED) are counted and
                   ignored
  --seconds N      exit 0 after N seconds (default: run until killed)
  --tag TEXT       a label for the process's command line; changes nothing
  -h, --help       print this text

Values are non-negative integers; `--flag VALUE` and `--flag=VALUE` both
work. Bad arguments exit with code 2; failures while loading exit with 1.
";

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Config {
    cpu_millis: u64,
    memory_mb: u64,
    disk_mb: u64,
    disk_io_kbps: u64,
    net_kbps: u64,
    seconds: Option<u64>,
}

#[derive(Debug, PartialEq, Eq)]
enum Command {
    Run(Config),
    Help,
}

fn parse_number(flag: &str, value: Option<&str>) -> Result<u64, String> {
    let value = value.ok_or_else(|| format!("{flag}: missing value"))?;
    value
        .trim()
        .parse::<u64>()
        .map_err(|e| format!("{flag}: invalid number '{value}': {e}"))
}

/// Parses the arguments after the program name.
fn parse_args<I, S>(args: I) -> Result<Command, String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let args: Vec<String> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let mut cfg = Config::default();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        i += 1;
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v)),
            _ => (arg, None),
        };
        let slot = match flag {
            "--cpu" => &mut cfg.cpu_millis,
            "--memory" => &mut cfg.memory_mb,
            "--disk" => &mut cfg.disk_mb,
            "--disk-io" => &mut cfg.disk_io_kbps,
            "--net" => &mut cfg.net_kbps,
            "--tag" => {
                // A label that only names the process (tests find it by
                // its command line); it changes nothing.
                if inline.is_none() {
                    i += 1;
                }
                continue;
            }
            "--seconds" => {
                let value = match inline {
                    Some(v) => Some(v),
                    None => {
                        i += 1;
                        args.get(i - 1).map(String::as_str)
                    }
                };
                cfg.seconds = Some(parse_number(flag, value)?);
                continue;
            }
            _ => return Err(format!("unknown argument '{arg}'")),
        };
        let value = match inline {
            Some(v) => Some(v),
            None => {
                i += 1;
                args.get(i - 1).map(String::as_str)
            }
        };
        *slot = parse_number(flag, value)?;
    }
    // Reject sizes that overflow byte counts up front.
    for (flag, value, unit) in [
        ("--memory", cfg.memory_mb, MIB),
        ("--disk", cfg.disk_mb, MIB),
        ("--disk-io", cfg.disk_io_kbps, KIB),
        ("--net", cfg.net_kbps, KIB),
    ] {
        if value
            .checked_mul(unit)
            .and_then(|b| usize::try_from(b).ok())
            .is_none()
        {
            return Err(format!("{flag}: value {value} is too large"));
        }
    }
    if cfg
        .memory_mb
        .checked_mul(MIB)
        .and_then(|b| isize::try_from(b).ok())
        .is_none()
    {
        return Err(format!("--memory: value {} is too large", cfg.memory_mb));
    }
    Ok(Command::Run(cfg))
}

fn describe(cfg: &Config) -> String {
    let duration = match cfg.seconds {
        Some(s) => format!("for {s} s"),
        None => "until killed".to_owned(),
    };
    format!(
        "edgepool-load: pid {}, cpu {}m, memory {} MiB, disk {} MiB, disk-io {} KiB/s, \
         net {} KB/s, {duration}",
        std::process::id(),
        cfg.cpu_millis,
        cfg.memory_mb,
        cfg.disk_mb,
        cfg.disk_io_kbps,
        cfg.net_kbps,
    )
}

/// Something went wrong while loading: say so and exit 1.
fn fail(what: &str, err: impl std::fmt::Display) -> ! {
    eprintln!("edgepool-load: {what}: {err}");
    std::process::exit(1)
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.to_owned()).spawn(f) {
        fail(&format!("spawning thread {name}"), e);
    }
}

/// Some work the optimiser cannot remove.
#[inline]
fn spin(x: &mut u64) {
    for _ in 0..1000 {
        *x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

fn busy_forever() {
    let mut x = 1u64;
    loop {
        spin(&mut x);
    }
}

/// Busy `busy` of every `PERIOD`, asleep for the rest. The busy part is
/// measured from the actual wake-up and the period boundaries are absolute,
/// so sleep overshoot shortens the sleep, not the busy part.
fn duty_cycle(busy: Duration) {
    let mut x = 1u64;
    let mut period_end = Instant::now() + PERIOD;
    loop {
        let woke = Instant::now();
        let busy_until = woke + busy;
        while Instant::now() < busy_until {
            spin(&mut x);
        }
        let now = Instant::now();
        if now < period_end {
            std::thread::sleep(period_end - now);
            period_end += PERIOD;
        } else {
            // Fell behind (descheduled): start over from now.
            period_end = now + PERIOD;
        }
    }
}

fn start_cpu(millis: u64) {
    for n in 0..millis / 1000 {
        spawn(&format!("cpu-{n}"), busy_forever);
    }
    let rem = millis % 1000;
    if rem > 0 {
        let busy = PERIOD * rem as u32 / 1000;
        spawn("cpu-duty", move || duty_cycle(busy));
    }
}

/// Allocates and touches `mb` MiB, then re-touches every page each second.
fn start_memory(mb: u64) {
    let Ok(len) = usize::try_from(mb * MIB) else {
        fail(
            "allocating memory",
            format!("{mb} MiB does not fit in usize"),
        );
    };
    let mut buf: Vec<u8> = Vec::new();
    if let Err(e) = buf.try_reserve_exact(len) {
        fail(&format!("allocating {mb} MiB"), e);
    }
    // Writes every byte, so every page becomes resident.
    buf.resize(len, 0);
    spawn("memory", move || {
        let mut round: u8 = 0;
        loop {
            round = round.wrapping_add(1);
            for i in (0..buf.len()).step_by(PAGE) {
                buf[i] = round;
            }
            std::hint::black_box(&mut buf);
            std::thread::sleep(Duration::from_secs(1));
        }
    });
}

/// Pseudo-random bytes, so compressing file systems store the full size.
fn fill_random(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Writes `mb` MiB to `load.dat` in 1 MiB chunks and fsyncs it.
fn fill_disk(mb: u64) {
    let mut file = match File::create(DISK_FILE) {
        Ok(f) => f,
        Err(e) => fail(&format!("creating {DISK_FILE}"), e),
    };
    let mut chunk = vec![0u8; MIB as usize];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for n in 0..mb {
        fill_random(&mut chunk, &mut state);
        if let Err(e) = file.write_all(&chunk) {
            fail(&format!("writing MiB {n} of {DISK_FILE}"), e);
        }
    }
    if let Err(e) = file.sync_all() {
        fail(&format!("fsync of {DISK_FILE}"), e);
    }
}

/// Rewrites `load-io.dat` at about `kbps` KiB/s, cycling through it, with
/// an fdatasync every second so that the next rewrite dirties the pages
/// again (and the kernel counts it as disk writes again).
///
/// A side file rather than `load.dat`: the kernel counts a write to a clean
/// page-cache folio as the whole folio, and `load.dat` (written in 1 MiB
/// chunks) may sit in large folios, which would inflate the count. The side
/// file is truncated first (dropping any cached folios) and only ever
/// written in 64 KiB chunks.
fn start_disk_io(kbps: u64) {
    let rate = kbps * KIB;
    // The cycle must cover more than a sync interval of writes, or pages
    // would be re-dirtied before writeback and not count: make it 2 s.
    let size = rate.saturating_mul(2).div_ceil(MIB).max(1) * MIB;
    let path = DISK_IO_FILE;
    let file = match OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => fail(&format!("creating {path}"), e),
    };
    if let Err(e) = file.set_len(size) {
        fail(&format!("sizing {path}"), e);
    }
    let mut chunk = vec![0u8; 64 * KIB as usize];
    let mut state = 0xD1B5_4A32_D192_ED03u64;
    fill_random(&mut chunk, &mut state);
    spawn("disk-io", move || {
        let start = Instant::now();
        let mut last_sync = start;
        let mut written: u64 = 0;
        let mut offset: u64 = 0;
        loop {
            let target = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            // Do not try to catch up more than a second after a stall.
            if target > written + rate {
                written = target - rate;
            }
            while written < target {
                let n = (target - written)
                    .min(chunk.len() as u64)
                    .min(size - offset);
                chunk[0] = chunk[0].wrapping_add(1);
                if let Err(e) = file.write_all_at(&chunk[..n as usize], offset) {
                    fail(&format!("rewriting {path}"), e);
                }
                written += n;
                offset = (offset + n) % size;
            }
            if last_sync.elapsed() >= Duration::from_secs(1) {
                if let Err(e) = file.sync_data() {
                    fail(&format!("fdatasync of {path}"), e);
                }
                last_sync = Instant::now();
            }
            std::thread::sleep(PERIOD);
        }
    });
}

/// Sends about `kbps` KiB/s of 1 KiB datagrams to the loopback discard port.
///
/// The socket is connected and written with write(2) (through a `File`):
/// sendto(2)/send(2) do not count in /proc/<pid>/io wchar, write(2) does.
/// On a connected UDP socket the ICMP port-unreachable from the previous
/// datagram makes the next write fail with ECONNREFUSED; such failures are
/// counted, ignored and retried, and pacing counts only datagrams sent.
fn start_net(kbps: u64) {
    let socket = match UdpSocket::bind("127.0.0.1:0") {
        Ok(s) => s,
        Err(e) => fail("binding UDP socket on 127.0.0.1:0", e),
    };
    if let Err(e) = socket.connect(NET_DEST) {
        fail(&format!("connecting UDP socket to {NET_DEST}"), e);
    }
    let mut file = File::from(OwnedFd::from(socket));
    let datagram = [0x5Au8; DATAGRAM];
    let per_sec = kbps; // datagrams per second, 1 KiB each
    spawn("net", move || {
        let start = Instant::now();
        let mut sent: u64 = 0;
        let mut errors: u64 = 0;
        loop {
            let target = (start.elapsed().as_secs_f64() * per_sec as f64) as u64;
            if target > sent + per_sec {
                sent = target - per_sec;
            }
            // Each failed write consumes one pending error, so allow about
            // one failure per datagram before giving up until the next tick.
            let mut attempts = 2 * (target.saturating_sub(sent)) + 2;
            while sent < target && attempts > 0 {
                attempts -= 1;
                match file.write(&datagram) {
                    // A UDP write sends the whole datagram or fails.
                    Ok(n) if n == DATAGRAM => sent += 1,
                    Ok(_) | Err(_) => errors = errors.wrapping_add(1),
                }
            }
            std::hint::black_box(errors);
            std::thread::sleep(PERIOD);
        }
    });
}

fn main() -> ExitCode {
    let cfg = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(cfg)) => cfg,
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("edgepool-load: {e}");
            eprintln!("Try 'edgepool-load --help' for usage.");
            return ExitCode::from(2);
        }
    };
    let start = Instant::now();
    {
        let mut out = std::io::stdout().lock();
        // Ignore stdout errors (e.g. closed pipe): the load matters, not the line.
        let _ = writeln!(out, "{}", describe(&cfg));
        let _ = out.flush();
    }

    if cfg.cpu_millis > 0 {
        start_cpu(cfg.cpu_millis);
    }
    if cfg.memory_mb > 0 {
        start_memory(cfg.memory_mb);
    }
    if cfg.net_kbps > 0 {
        start_net(cfg.net_kbps);
    }
    // In this thread, so `--seconds` never exits with a half-written file.
    if cfg.disk_mb > 0 {
        fill_disk(cfg.disk_mb);
    }
    if cfg.disk_io_kbps > 0 {
        start_disk_io(cfg.disk_io_kbps);
    }

    match cfg.seconds {
        Some(s) => {
            let deadline = start + Duration::from_secs(s);
            let now = Instant::now();
            if now < deadline {
                std::thread::sleep(deadline - now);
            }
            ExitCode::SUCCESS
        }
        None => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Config {
        match parse_args(args) {
            Ok(Command::Run(cfg)) => cfg,
            other => panic!("{args:?}: expected a config, got {other:?}"),
        }
    }

    fn err(args: &[&str]) -> String {
        match parse_args(args) {
            Err(e) => e,
            Ok(c) => panic!("{args:?}: expected an error, got {c:?}"),
        }
    }

    #[test]
    fn no_arguments_is_an_idle_run() {
        assert_eq!(run(&[]), Config::default());
    }

    #[test]
    fn single_flags() {
        assert_eq!(run(&["--cpu", "600"]).cpu_millis, 600);
        assert_eq!(run(&["--memory", "100"]).memory_mb, 100);
        assert_eq!(run(&["--disk", "20"]).disk_mb, 20);
        assert_eq!(run(&["--disk-io", "256"]).disk_io_kbps, 256);
        assert_eq!(run(&["--net", "500"]).net_kbps, 500);
        assert_eq!(run(&["--seconds", "3"]).seconds, Some(3));
        assert_eq!(run(&["--seconds", "0"]).seconds, Some(0));
    }

    #[test]
    fn combination_with_both_value_styles() {
        let cfg = run(&[
            "--cpu=1500",
            "--memory",
            "64",
            "--disk=10",
            "--disk-io",
            "128",
            "--net=50",
            "--seconds",
            "7",
        ]);
        assert_eq!(
            cfg,
            Config {
                cpu_millis: 1500,
                memory_mb: 64,
                disk_mb: 10,
                disk_io_kbps: 128,
                net_kbps: 50,
                seconds: Some(7),
            }
        );
    }

    #[test]
    fn last_occurrence_wins() {
        assert_eq!(run(&["--cpu", "100", "--cpu", "200"]).cpu_millis, 200);
    }

    #[test]
    fn help_anywhere() {
        assert_eq!(parse_args(["--help"]), Ok(Command::Help));
        assert_eq!(parse_args(["-h"]), Ok(Command::Help));
        assert_eq!(parse_args(["--cpu", "5", "--help"]), Ok(Command::Help));
    }

    #[test]
    fn bad_numbers_name_the_flag() {
        for flag in [
            "--cpu",
            "--memory",
            "--disk",
            "--disk-io",
            "--net",
            "--seconds",
        ] {
            for bad in ["abc", "-5", "1.5", "", "12x"] {
                let e = err(&[flag, bad]);
                assert!(e.starts_with(&format!("{flag}:")), "{flag} {bad:?}: {e}");
                assert!(e.contains("invalid number"), "{flag} {bad:?}: {e}");
            }
            let e = err(&[&format!("{flag}=nope")]);
            assert!(e.starts_with(&format!("{flag}:")), "{e}");
        }
    }

    #[test]
    fn missing_value_names_the_flag() {
        assert_eq!(err(&["--cpu"]), "--cpu: missing value");
        assert_eq!(
            err(&["--memory", "1", "--seconds"]),
            "--seconds: missing value"
        );
    }

    #[test]
    fn flag_is_not_taken_as_a_value() {
        let e = err(&["--cpu", "--memory", "5"]);
        assert!(e.starts_with("--cpu:"), "{e}");
    }

    #[test]
    fn unknown_arguments_are_rejected() {
        assert!(err(&["--gpu", "1"]).contains("'--gpu'"));
        assert!(err(&["600"]).contains("'600'"));
        assert!(err(&["--cpu", "1", "extra"]).contains("'extra'"));
    }

    #[test]
    fn overflowing_sizes_are_rejected() {
        let big = u64::MAX.to_string();
        let e = err(&["--memory", &big]);
        assert!(e.starts_with("--memory:") && e.contains("too large"), "{e}");
        let e = err(&["--net", &big]);
        assert!(e.starts_with("--net:"), "{e}");
        // Large but representable values are fine for the parser.
        assert_eq!(run(&["--cpu", &big]).cpu_millis, u64::MAX);
    }

    #[test]
    fn description_line() {
        let cfg = Config {
            cpu_millis: 600,
            ..Config::default()
        };
        let line = describe(&cfg);
        assert!(line.starts_with("edgepool-load: pid "), "{line}");
        assert!(
            line.contains(
                "cpu 600m, memory 0 MiB, disk 0 MiB, disk-io 0 KiB/s, net 0 KB/s, until killed"
            ),
            "{line}"
        );
    }
}
