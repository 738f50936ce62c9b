//! The control interface: one command per line, on stdin and on a UNIX
//! socket (`DIR/control.sock`, one or more commands per connection). Each
//! answer is zero or more lines of data followed by `ok` or `error: WHY`.
//!
//! The commands are in [`HELP`] (also printed by `help` and `--help`):
//! `status`, `list`, `kill`, `start`, `freeze`, `thaw`, `disconnect`,
//! `reconnect`. Targets: agent indexes (`7`), ranges (`0-9`), node ids
//! (`swarm-00007`) or `all`, separated by spaces or commas.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;

pub const HELP: &str = "\
status                   counts: agents, running, connected, frozen, disconnected, killed, failed
list [TARGETS]           one line per agent: index node-id phase link flags peer-address
kill TARGETS             close every socket of the agent and stop it (like SIGKILL)
start TARGETS            start killed (or failed) agents again, with their cached credentials
freeze TARGETS           hold every byte to and from the agent, sockets stay open (like SIGSTOP)
thaw TARGETS             let its bytes flow again (like SIGCONT)
disconnect TARGETS       reset its link to the manager and refuse new ones (peer links stay)
reconnect TARGETS        let it connect to the manager again
help                     this list
TARGETS: indexes (7), ranges (0-9), node ids (swarm-00007) or all; spaces or commas between";

/// Which agents a command is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    All,
    Index(usize),
    /// Inclusive.
    Range(usize, usize),
    NodeId(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Kill,
    Start,
    Freeze,
    Thaw,
    Disconnect,
    Reconnect,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Status,
    Help,
    List(Vec<Target>),
    Act(Action, Vec<Target>),
}

/// Parses one command line.
pub fn parse(line: &str) -> Result<Command, String> {
    let mut words = line
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty());
    let verb = words.next().ok_or("empty command")?;
    let targets = words.map(parse_target).collect::<Result<Vec<_>, _>>()?;
    let act = |a: Action| {
        if targets.is_empty() {
            Err(format!(
                "{verb} needs a target (an index, a range, a node id or all)"
            ))
        } else {
            Ok(Command::Act(a, targets.clone()))
        }
    };
    match verb.to_ascii_lowercase().as_str() {
        "status" => Ok(Command::Status),
        "help" => Ok(Command::Help),
        "list" | "ls" => Ok(Command::List(if targets.is_empty() {
            vec![Target::All]
        } else {
            targets.clone()
        })),
        "kill" => act(Action::Kill),
        "start" => act(Action::Start),
        "freeze" => act(Action::Freeze),
        "thaw" => act(Action::Thaw),
        "disconnect" => act(Action::Disconnect),
        "reconnect" => act(Action::Reconnect),
        other => Err(format!("unknown command {other:?} (try help)")),
    }
}

fn parse_target(word: &str) -> Result<Target, String> {
    if word == "all" {
        return Ok(Target::All);
    }
    if let Ok(i) = word.parse::<usize>() {
        return Ok(Target::Index(i));
    }
    if let Some((a, b)) = word.split_once('-')
        && let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>())
    {
        return if a <= b {
            Ok(Target::Range(a, b))
        } else {
            Err(format!("empty range {word}"))
        };
    }
    Ok(Target::NodeId(word.to_string()))
}

/// The agent indexes `targets` name, among `ids` (index = position).
pub fn resolve(targets: &[Target], ids: &[String]) -> Result<BTreeSet<usize>, String> {
    let mut out = BTreeSet::new();
    for t in targets {
        match t {
            Target::All => out.extend(0..ids.len()),
            Target::Index(i) if *i < ids.len() => {
                out.insert(*i);
            }
            Target::Range(a, b) if *b < ids.len() => out.extend(*a..=*b),
            Target::Index(_) | Target::Range(..) => {
                return Err(format!(
                    "{t:?} is out of range (agents 0-{})",
                    ids.len().saturating_sub(1)
                ));
            }
            Target::NodeId(id) => match ids.iter().position(|x| x == id) {
                Some(i) => {
                    out.insert(i);
                }
                None => return Err(format!("no agent {id:?}")),
            },
        }
    }
    Ok(out)
}

/// Runs one command line against the fleet and returns the answer (ending
/// in `ok` or `error: ...`, newline-terminated).
pub fn answer(fleet: &Fleet, line: &str) -> String {
    let mut out = match parse(line).and_then(|c| fleet.execute(c)) {
        Ok(lines) => lines.into_iter().map(|l| l + "\n").collect::<String>() + "ok",
        Err(e) => format!("error: {e}"),
    };
    out.push('\n');
    out
}

/// Serves commands from `input` (one per line), answering on `output`,
/// until the input ends or `stop` fires.
pub async fn serve_lines<R, W>(fleet: Arc<Fleet>, input: R, mut output: W, stop: CancellationToken)
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut lines = BufReader::new(input).lines();
    loop {
        let line = tokio::select! {
            _ = stop.cancelled() => return,
            l = lines.next_line() => l,
        };
        let line = match line {
            Ok(Some(l)) => l,
            Ok(None) | Err(_) => return,
        };
        if line.trim().is_empty() {
            continue;
        }
        let reply = answer(&fleet, &line);
        if output.write_all(reply.as_bytes()).await.is_err() || output.flush().await.is_err() {
            return;
        }
    }
}

/// Accepts control connections on the UNIX socket at `path` until `stop`.
pub async fn serve_socket(
    fleet: Arc<Fleet>,
    path: &Path,
    stop: CancellationToken,
) -> std::io::Result<()> {
    // A socket left by an earlier run that was killed.
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    tracing::info!(path = %path.display(), "control socket listening");
    loop {
        let (conn, _) = tokio::select! {
            _ = stop.cancelled() => break,
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (r, w) = conn.into_split();
        tokio::spawn(serve_lines(fleet.clone(), r, w, stop.clone()));
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(parse("status").unwrap(), Command::Status);
        assert_eq!(parse("list").unwrap(), Command::List(vec![Target::All]));
        assert_eq!(
            parse("freeze 3, 5-7 swarm-00009").unwrap(),
            Command::Act(
                Action::Freeze,
                vec![
                    Target::Index(3),
                    Target::Range(5, 7),
                    Target::NodeId("swarm-00009".into())
                ]
            )
        );
        assert!(parse("kill").is_err());
        assert!(parse("kill 7-3").is_err());
        assert!(parse("explode 1").is_err());
        assert!(parse("   ").is_err());
    }

    #[test]
    fn targets_resolve_to_indexes() {
        let ids: Vec<String> = (0..5).map(|i| format!("s-{i}")).collect();
        let r = |t| resolve(&parse_targets(t), &ids);
        assert_eq!(
            r("1 3-4").unwrap().into_iter().collect::<Vec<_>>(),
            [1, 3, 4]
        );
        assert_eq!(r("s-2").unwrap().into_iter().collect::<Vec<_>>(), [2]);
        assert_eq!(r("all").unwrap().len(), 5);
        assert!(r("5").is_err());
        assert!(r("4-5").is_err());
        assert!(r("s-9").is_err());
    }

    fn parse_targets(s: &str) -> Vec<Target> {
        s.split_whitespace()
            .map(|w| parse_target(w).unwrap())
            .collect()
    }
}
