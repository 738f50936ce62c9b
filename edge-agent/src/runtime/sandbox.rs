//! What an app may touch: the user it runs as, its environment, its
//! working directory and its cgroup.
//!
//! An agent that runs as root starts every app as `run_as` (an
//! unprivileged user; std drops the supplementary groups too), with a
//! clean environment, in `apps_dir/<name>/` (owned by that user, mode
//! 0700) — never under the agent's data dir, which is owner-only (0700) so
//! that no app reaches the node key, the certificates or `app.json`. An
//! agent that does not run as root cannot change users: its apps run as
//! itself (one warning says so).

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid, User};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use super::cgroup::{Cgroups, Counters, Limits};
use super::{AppSpec, STDERR_LOG, STDOUT_LOG, open_log, signal_group};

/// Holds the app's first process until the runtime has put it into the
/// app's cgroup (a line on stdin), then becomes the app: nothing the app
/// runs ever starts outside its cgroup. EOF instead (the agent died) ends
/// it without running the app. `$0` is the program, `$@` its arguments.
const HOLD_UNTIL_PLACED: &str = "read -r _ && exec \"$0\" \"$@\" </dev/null";
const MIB: u64 = 1024 * 1024;

/// The PATH of every app (unless its spec sets one).
pub const APP_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The LANG of every app (unless its spec sets one).
pub const APP_LANG: &str = "C.UTF-8";

/// The user apps run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "run_as (config field `run_as`, flag --run-as): there is no user {user:?} on this \
         machine; create it (the edge-agent package makes `edgepool-app`) or name another \
         unprivileged user"
    )]
    NoSuchUser { user: String },
    #[error("run_as (config field `run_as`, flag --run-as): looking up user {user:?}: {source}")]
    Lookup {
        user: String,
        #[source]
        source: nix::Error,
    },
    #[error(
        "run_as (config field `run_as`, flag --run-as): {user:?} is root (uid 0); apps must \
         run as an unprivileged user"
    )]
    Root { user: String },
    #[error("apps_dir {dir}: {source}")]
    AppsDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How a runtime confines its apps (see the module doc).
pub struct Sandbox {
    /// Parent of the apps' working directories.
    pub(super) apps_dir: PathBuf,
    /// None: apps run as the agent's user.
    pub(super) user: Option<AppUser>,
    pub(super) cgroups: Cgroups,
}

impl Sandbox {
    /// `run_as` is resolved only when the agent runs as root (empty: apps
    /// run as root too, which only a test setup should want). `tag` names
    /// this agent's app cgroups apart from other agents' on the machine.
    pub fn new(run_as: &str, apps_dir: PathBuf, tag: &str) -> Result<Sandbox, SandboxError> {
        let user = if !Uid::effective().is_root() {
            if !run_as.is_empty() {
                tracing::warn!(
                    run_as,
                    "the agent does not run as root: run_as is ignored and apps run as the \
                     agent's own user"
                );
            }
            None
        } else if run_as.is_empty() {
            tracing::warn!("run_as is empty: apps run as root");
            None
        } else {
            Some(lookup(run_as)?)
        };
        std::fs::create_dir_all(&apps_dir)
            .and_then(|()| owned_dir(&apps_dir))
            .and_then(|()| {
                // Traversable by the app user, writable by the agent only.
                std::fs::set_permissions(&apps_dir, std::fs::Permissions::from_mode(0o755))
            })
            .map_err(|source| SandboxError::AppsDir {
                dir: apps_dir.clone(),
                source,
            })?;
        Ok(Sandbox {
            apps_dir,
            user,
            cgroups: Cgroups::setup(tag),
        })
    }

    /// Creates (or takes over) the app's working directory: owned by the
    /// app user, mode 0700.
    pub(super) fn prepare_workdir(&self, app: &str) -> io::Result<PathBuf> {
        let dir = self.apps_dir.join(app);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            // A symlink or a file where the dir belongs (an app may have
            // put it there): remove it rather than follow it.
            Ok(_) => {
                std::fs::remove_file(&dir)?;
                std::fs::create_dir(&dir)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir(&dir)?,
            Err(e) => return Err(e),
        }
        if let Some(user) = &self.user {
            nix::unistd::chown(
                &dir,
                Some(Uid::from_raw(user.uid)),
                Some(Gid::from_raw(user.gid)),
            )
            .map_err(io::Error::from)?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(dir)
    }
}

/// A real directory of the agent's own user (not a symlink someone else
/// planted, in /tmp for example).
fn owned_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(dir)?;
    if !m.is_dir() {
        return Err(io::Error::other("not a directory (a symlink?)"));
    }
    if m.uid() != Uid::effective().as_raw() {
        return Err(io::Error::other(format!(
            "owned by uid {}, not by the agent's user",
            m.uid()
        )));
    }
    Ok(())
}

fn lookup(name: &str) -> Result<AppUser, SandboxError> {
    let user = User::from_name(name)
        .map_err(|source| SandboxError::Lookup {
            user: name.to_string(),
            source,
        })?
        .ok_or_else(|| SandboxError::NoSuchUser {
            user: name.to_string(),
        })?;
    if user.uid.is_root() {
        return Err(SandboxError::Root {
            user: name.to_string(),
        });
    }
    Ok(AppUser {
        name: name.to_string(),
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    })
}

/// The whole environment of an app: PATH, HOME (its working dir) and LANG,
/// then its spec's variables, which may override any of the three.
pub(super) fn app_env(
    spec_env: &BTreeMap<String, String>,
    workdir: &Path,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("PATH".to_string(), APP_PATH.to_string()),
        ("HOME".to_string(), workdir.display().to_string()),
        ("LANG".to_string(), APP_LANG.to_string()),
    ]);
    env.extend(spec_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// Whether `program` can be started with `path` as PATH: a name with a
/// slash is taken as is, relative to `dir`.
pub(super) fn find_program(program: &str, path: &str, dir: &Path) -> Option<PathBuf> {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = dir.join(program);
        return executable(&p).then_some(p);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_is_clean_and_the_spec_overrides() {
        let spec = BTreeMap::from([
            ("LANG".to_string(), "de_DE.UTF-8".to_string()),
            ("MODE".to_string(), "fast".to_string()),
        ]);
        let env = app_env(&spec, Path::new("/apps/web"));
        assert_eq!(
            env.into_iter().collect::<Vec<_>>(),
            [
                ("HOME".to_string(), "/apps/web".to_string()),
                ("LANG".to_string(), "de_DE.UTF-8".to_string()),
                ("MODE".to_string(), "fast".to_string()),
                ("PATH".to_string(), APP_PATH.to_string()),
            ]
        );
    }

    #[test]
    fn unknown_user_is_named() {
        let err = lookup("no-such-user-edgepool-test")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-user-edgepool-test"), "{err}");
        assert!(err.contains("run_as") && err.contains("--run-as"), "{err}");
        let err = lookup("root").unwrap_err().to_string();
        assert!(err.contains("unprivileged"), "{err}");
    }

    #[test]
    fn programs_are_found_in_path() {
        assert!(find_program("sh", APP_PATH, Path::new("/")).is_some());
        assert!(find_program("no-such-program-edgepool", APP_PATH, Path::new("/")).is_none());
        assert_eq!(
            find_program("/bin/sh", "", Path::new("/tmp")),
            Some(PathBuf::from("/bin/sh"))
        );
    }
}

/// Starts a sandboxed app: in its cgroup (when there are cgroups), as the
/// app user, with the app's environment, in its working directory; stdout
/// and stderr into `state_dir` (the agent's, which the app cannot open).
pub(super) async fn spawn(
    spec: &AppSpec,
    state_dir: &Path,
    sandbox: Arc<Sandbox>,
) -> io::Result<(Child, u32)> {
    let name = spec.name.clone();
    let limits = spec.limits;
    let sb = sandbox.clone();
    let state = state_dir.to_path_buf();
    let workdir = tokio::task::spawn_blocking(move || -> io::Result<PathBuf> {
        std::fs::create_dir_all(&state)?;
        if sb.cgroups.enabled() {
            sb.cgroups.create(&name, limits).map_err(io::Error::other)?;
        }
        sb.prepare_workdir(&name)
    })
    .await
    .map_err(io::Error::other)??;
    let env = app_env(&spec.env, &workdir);
    let (program, args) = spec
        .command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let path = env.get("PATH").map(String::as_str).unwrap_or_default();
    if find_program(program, path, &workdir).is_none() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no executable {program:?} (PATH={path})"),
        ));
    }
    let placed = sandbox.cgroups.enabled();
    let mut command = if placed {
        let mut c = Command::new("/bin/sh");
        c.arg("-c")
            .arg(HOLD_UNTIL_PLACED)
            .arg(program)
            .args(args)
            .stdin(Stdio::piped());
        c
    } else {
        let mut c = Command::new(program);
        c.args(args).stdin(Stdio::null());
        c
    };
    command
        .env_clear()
        .envs(&env)
        .current_dir(&workdir)
        .stdout(open_log(&state_dir.join(STDOUT_LOG))?)
        .stderr(open_log(&state_dir.join(STDERR_LOG))?)
        // Its own group, so that a stop reaches everything the app started.
        .process_group(0);
    if let Some(user) = &sandbox.user {
        // As root, std also drops the supplementary groups.
        command.uid(user.uid).gid(user.gid);
    }
    let mut child = command.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("the spawned process has no pid"))?;
    if placed {
        let name = spec.name.clone();
        let added = tokio::task::spawn_blocking(move || sandbox.cgroups.add(&name, pid))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r.map_err(io::Error::other));
        let released = match (added, child.stdin.take()) {
            (Ok(()), Some(mut stdin)) => stdin.write_all(b"placed\n").await,
            (Ok(()), None) => Err(io::Error::other("no stdin pipe to the app")),
            (Err(e), _) => Err(e),
        };
        if let Err(e) = released {
            signal_group(pid, Signal::SIGKILL);
            let _ = child.wait().await;
            return Err(io::Error::other(format!(
                "could not put the app into its cgroup: {e}"
            )));
        }
    }
    Ok((child, pid))
}

/// An app re-adopted after an agent restart keeps its cgroup (created and
/// joined here if an agent without cgroups started it) and gets the
/// current limits.
pub(super) fn adopt_cgroup(cgroups: &Cgroups, app: &str, pid: u32, limits: Limits) {
    if !cgroups.enabled() {
        return;
    }
    if let Err(e) = cgroups.create(app, limits) {
        tracing::warn!(app, error = %e, "the adopted app has no cgroup");
        return;
    }
    if !cgroups.contains(app, pid) {
        match cgroups.add(app, pid) {
            Ok(()) => tracing::info!(app, pid, "moved the adopted app into its cgroup"),
            Err(e) => {
                tracing::warn!(app, pid, error = %e, "moving the adopted app into its cgroup failed")
            }
        }
    }
}

/// Removes the app cgroups of apps that are neither supervised nor
/// adopted: what an agent that crashed while stopping an app leaves.
pub(super) fn remove_stale_cgroups(cgroups: &Cgroups, keep: &HashSet<String>) {
    for app in cgroups.list() {
        if !keep.contains(&app) {
            tracing::info!(app = %app, "removing a stale app cgroup");
            cgroups.remove(&app);
        }
    }
}

/// The last cgroup measurement of one app.
#[derive(Debug, Default)]
pub(super) struct CgroupSample {
    pub at: Option<Instant>,
    cpu_usec: Option<u64>,
    pub cpu_millis: Option<u64>,
    pub memory_mb: Option<u64>,
}

impl CgroupSample {
    pub(super) fn update(&mut self, c: Counters, now: Instant) {
        self.cpu_millis = match (self.at, self.cpu_usec, c.cpu_usec) {
            (Some(at), Some(before), Some(usec)) => {
                let secs = now.duration_since(at).as_secs_f64();
                (secs > 0.0).then(|| (usec.saturating_sub(before) as f64 / secs / 1000.0) as u64)
            }
            _ => None,
        };
        self.cpu_usec = c.cpu_usec;
        self.memory_mb = c.memory_bytes.map(|b| b.div_ceil(MIB));
        self.at = Some(now);
    }
}
