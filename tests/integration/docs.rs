//! The docs test: runs README.md's shell blocks, in order, against a real
//! dev fleet, the way a newcomer pastes them into a second terminal.
//!
//! How each block runs is said by an HTML comment on the line before its
//! fence (none = run it, it must exit 0 within two minutes):
//! - `<!-- docs-test: fleet ... -->`: the Quick start. Its first command
//!   (`cargo run -p cloud-manager -- dev`) starts the fleet: the test runs
//!   the binary that cargo would run (the suite has built it) with a data
//!   dir of its own; its other commands are listed as skipped.
//! - `<!-- docs-test: skip (why) -->`: printed as skipped, with the reason.
//! - `<!-- docs-test: background[, expect TEXT] -->`: started and left
//!   running (a follow command in another terminal); at the end its output
//!   must contain TEXT.
//! - `<!-- docs-test: until TEXT -->`: a follow command that must print TEXT
//!   within two minutes; then it is stopped.
//!
//! Blocks run with bash (`set -e`) in the repository's root, so `$PWD`
//! and relative paths mean what they mean for the user, with two
//! differences: the fleet's data dir is `target/docs-test/edgepool-dev`
//! instead of `./edgepool-dev` (so a developer's own dev dir is never
//! touched), and `cargo build` lines only check that the binary they build
//! exists (the suite built the workspace; building one package alone could
//! rebuild dependencies under the running tests). Variables and `export`s
//! of a block stay set for the blocks after it, as in one terminal. The
//! fleet uses the README's own addresses: 127.0.0.1:7443 and
//! 127.0.1.N:7444.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use edgepool_tests::*;
use nix::sys::signal::Signal;

/// How long one block may take.
const BLOCK_DEADLINE: Duration = Duration::from_secs(120);
/// What replaces `edgepool-dev` in the blocks (relative to the repository).
const TEST_DIR: &str = "target/docs-test";

#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    /// The `docs-test:` annotation, if any.
    how: Option<String>,
    text: String,
}

/// The ```sh blocks of a Markdown text, with their annotations.
fn blocks(markdown: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut how: Option<String> = None;
    let mut current: Option<Block> = None;
    for (i, line) in markdown.lines().enumerate() {
        if let Some(b) = current.as_mut() {
            if line.trim_start().starts_with("```") {
                out.push(current.take().expect("open block"));
            } else {
                b.text.push_str(line);
                b.text.push('\n');
            }
            continue;
        }
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("<!-- docs-test:") {
            how = Some(rest.trim_end_matches("-->").trim().to_string());
        } else if t == "```sh" || t == "```bash" {
            current = Some(Block {
                line: i + 1,
                how: how.take(),
                text: String::new(),
            });
        } else if !t.is_empty() {
            // An annotation belongs to the block right after it.
            how = None;
        }
    }
    assert!(current.is_none(), "README.md: a ```sh block is not closed");
    out
}

/// The block as the test runs it (see the module comment).
fn adapt(text: &str) -> String {
    text.lines()
        .map(|line| {
            let line = line
                .replace("./edgepool-dev", &format!("./{TEST_DIR}/edgepool-dev"))
                .replace(
                    "$PWD/edgepool-dev",
                    &format!("$PWD/{TEST_DIR}/edgepool-dev"),
                );
            match line.trim_start().strip_prefix("cargo build ") {
                Some(args) => {
                    let bin = args
                        .split_whitespace()
                        .skip_while(|a| *a != "--bin")
                        .nth(1)
                        .unwrap_or("cloud-manager");
                    format!("test -x target/debug/{bin}  # docs test: built by the suite")
                }
                None => line,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Lines that set variables (`X=...`, `export X=...`): a terminal keeps
/// them for the commands typed after.
fn assignments(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| {
            let l = l.trim_start();
            let l = l.strip_prefix("export ").unwrap_or(l);
            l.split(';').all(|part| {
                let part = part.trim();
                part.is_empty()
                    || part.split_once('=').is_some_and(|(name, _)| {
                        !name.is_empty()
                            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    })
            })
        })
        .map(str::to_string)
        .collect()
}

fn bash(repo: &Path, script: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.current_dir(repo)
        .args(["-e", "-o", "pipefail", "-c", script]);
    cmd
}

fn shown(b: &Block) -> String {
    format!("README.md:{}:\n{}", b.line, b.text)
}

/// The fleet: `dev` on the README's addresses; stopped with Ctrl-C (SIGINT)
/// at the end, killed (with its sessions) if the test fails first.
struct Fleet {
    dev: Proc,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.dev.signal(Signal::SIGINT);
        let _ = self.dev.wait_exit(Duration::from_secs(5));
    }
}

fn start_fleet(repo: &Path, b: &Block, logs: &Path) -> Fleet {
    let first = b.text.lines().next().unwrap_or_default();
    let command = first.split('#').next().unwrap_or_default().trim();
    let args = command
        .strip_prefix("cargo run -p cloud-manager -- ")
        .unwrap_or_else(|| panic!("the Quick start's first command is not `cargo run -p cloud-manager -- ...`: {first}"));
    let mut cmd = Command::new(bin("cloud-manager"));
    cmd.current_dir(repo)
        .args(args.split_whitespace())
        .args(["--data-dir", &format!("{TEST_DIR}/edgepool-dev")]);
    let dev = Proc::spawn("dev", &mut cmd, &logs.join("dev.log"));
    for skipped in b.text.lines().skip(1) {
        println!(
            "docs test: README.md:{} skipped (fleet block): {skipped}",
            b.line
        );
    }
    Fleet { dev }
}

#[tokio::test]
async fn readme_commands_work_as_written() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf();
    assert_eq!(
        bin_dir().canonicalize().ok(),
        repo.join("target/debug").canonicalize().ok(),
        "the README uses $PWD/target/debug: run the suite with the default target dir"
    );
    let out = run(Command::new("sh").args(["-c", "command -v grpcurl"]));
    assert!(
        out.ok,
        "grpcurl is not installed (scripts/test.sh installs it)"
    );
    let readme = std::fs::read_to_string(repo.join("README.md")).expect("README.md");
    let work = repo.join(TEST_DIR);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("creating the docs test dir");
    let logs = TempDir::new().expect("temp dir");

    let mut fleet: Option<Fleet> = None;
    let mut background: Vec<(Proc, Option<String>, String)> = Vec::new();
    let mut prelude: Vec<String> = Vec::new();
    let mut ran = 0;
    for (i, b) in blocks(&readme).iter().enumerate() {
        let how = b.how.clone().unwrap_or_default();
        if how.starts_with("skip") {
            println!("docs test: README.md:{} skipped: {how}", b.line);
            continue;
        }
        if how.starts_with("fleet") {
            let f = start_fleet(&repo, b, logs.path());
            eventually("the dev fleet to be up", Duration::from_secs(90), || {
                let up = f.dev.log_text().contains("edgepool dev is up");
                async move { up.then_some(()) }
            })
            .await;
            fleet = Some(f);
            continue;
        }
        let dev_log = || {
            fleet
                .as_ref()
                .map(|f| f.dev.log_text())
                .unwrap_or_else(|| "(no fleet started yet)".into())
        };
        let script = format!("{}\n{}", prelude.join("\n"), adapt(&b.text));
        let log = logs.path().join(format!("block-{i}.log"));
        let mut proc = Proc::spawn(
            &format!("block {}", b.line),
            &mut bash(&repo, &script),
            &log,
        );
        if let Some(rest) = how.strip_prefix("background") {
            let expect = rest
                .trim_start_matches(',')
                .trim()
                .strip_prefix("expect ")
                .map(|t| t.trim().to_string());
            // Give a follow command time to open its stream before the next
            // block acts, as a user switching terminals would.
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(
                proc.child.try_wait().ok().flatten().is_none(),
                "{} ended at once:\n{}",
                shown(b),
                proc.log_text()
            );
            background.push((proc, expect, shown(b)));
        } else if let Some(text) = how.strip_prefix("until ") {
            let text = text.trim().to_string();
            let start = Instant::now();
            while !proc.log_text().contains(&text) {
                assert!(
                    start.elapsed() < BLOCK_DEADLINE,
                    "{} did not print {text:?} within {BLOCK_DEADLINE:?}:\n{}\n--- dev log:\n{}",
                    shown(b),
                    proc.log_text(),
                    dev_log()
                );
                assert!(
                    proc.child.try_wait().ok().flatten().is_none(),
                    "{} ended before printing {text:?}:\n{}",
                    shown(b),
                    proc.log_text()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        } else {
            assert!(
                how.is_empty(),
                "README.md:{}: unknown docs-test annotation {how:?}",
                b.line
            );
            let status = proc.wait_exit(BLOCK_DEADLINE);
            assert!(
                status.is_some_and(|s| s.success()),
                "{} failed ({status:?}):\n{}\n--- dev log:\n{}",
                shown(b),
                proc.log_text(),
                dev_log()
            );
        }
        prelude.extend(assignments(&adapt(&b.text)));
        ran += 1;
    }
    assert!(ran >= 8, "only {ran} README blocks ran");
    let mut fleet = fleet.expect("no `docs-test: fleet` block in README.md");

    // Ctrl-C ends everything within 2 s, open event streams included,
    // which end with a gRPC status rather than a broken connection.
    let stopping = Instant::now();
    fleet.dev.signal(Signal::SIGINT);
    let status = fleet.dev.wait_exit(Duration::from_secs(10));
    let took = stopping.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "dev: {status:?}\n{}",
        fleet.dev.log_text()
    );
    assert!(took < Duration::from_secs(2), "Ctrl-C took {took:?}");
    println!(
        "docs test: Ctrl-C stopped the fleet in {} ms",
        took.as_millis()
    );
    for (proc, expect, block) in &mut background {
        let status = proc.wait_exit(Duration::from_secs(5));
        let text = proc.log_text();
        assert!(
            status.is_some(),
            "{block} still runs after the fleet stopped:\n{text}"
        );
        assert!(
            text.contains("Unavailable: manager is shutting down"),
            "{block} did not end with UNAVAILABLE:\n{text}"
        );
        if let Some(expect) = expect {
            assert!(
                text.contains(expect.as_str()),
                "{block} never printed {expect:?}:\n{text}"
            );
        }
    }
    let left = processes_mentioning(&format!("{TEST_DIR}/edgepool-dev"));
    assert!(left.is_empty(), "processes left running: {left:?}");
}

/// Live processes whose command line mentions `text`.
fn processes_mentioning(text: &str) -> Vec<(i32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .map(|pid| (pid, cmdline(pid)))
        .filter(|(pid, cmd)| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            cmd.contains(text) && !stat.contains(") Z ")
        })
        .collect()
}

#[test]
fn annotations_are_read() {
    let md = "text\n<!-- docs-test: skip (why) -->\n```sh\na\n```\n\n```sh\nX=1; Y=2\nexport P=\"$PWD/edgepool-dev/bin:$PATH\"\ncargo build -p t --bin load\n```\n";
    let b = blocks(md);
    assert_eq!(b.len(), 2);
    assert_eq!(b[0].how.as_deref(), Some("skip (why)"));
    assert_eq!(b[1].how, None);
    let adapted = adapt(&b[1].text);
    assert!(
        adapted.contains("$PWD/target/docs-test/edgepool-dev/bin"),
        "{adapted}"
    );
    assert!(adapted.contains("test -x target/debug/load"), "{adapted}");
    assert_eq!(assignments(&adapted).len(), 2);
}
