//! The simulated app runtime of `edgepool-swarm`'s virtual agents: apps
//! that "run" without an OS process, so thousands of agents in one process
//! can hold pool groups. A start succeeds at once with a made-up pid; the
//! manager, the peers and the offload engine see the same `AppStatus`es a
//! real runtime reports.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use super::{AppState, AppStatus, AppUsage, Wanted, lock};

/// Made-up pids start above the largest `pid_max` Linux allows (2^22), so
/// they never name a real process (`/proc/<pid>` of one does not exist),
/// and are unique in the process (each start gets a new one, as a real
/// restart would).
const FIRST_PID: u32 = 1 << 23;
static NEXT_PID: AtomicU32 = AtomicU32::new(FIRST_PID);

pub(super) struct Apps {
    usage: AppUsage,
    apps: Mutex<BTreeMap<String, App>>,
}

struct App {
    hash: String,
    state: AppState,
    pid: Option<u32>,
}

impl Apps {
    pub(super) fn new(usage: AppUsage) -> Self {
        Apps {
            usage,
            apps: Mutex::new(BTreeMap::new()),
        }
    }

    /// Like the real reconcile: apps not wanted go, a changed spec
    /// restarts (new pid), missing apps start.
    pub(super) fn reconcile(&self, desired: BTreeMap<String, Wanted>) {
        let mut apps = lock(&self.apps);
        apps.retain(|name, app| {
            desired
                .get(name)
                .is_some_and(|w| w.hash == app.hash && app.state == AppState::Running)
        });
        for (name, wanted) in desired {
            apps.entry(name).or_insert_with(|| App {
                hash: wanted.hash,
                state: AppState::Running,
                pid: Some(NEXT_PID.fetch_add(1, Ordering::Relaxed)),
            });
        }
    }

    pub(super) fn status(&self) -> Vec<AppStatus> {
        lock(&self.apps)
            .iter()
            .map(|(name, app)| AppStatus {
                name: name.clone(),
                state: app.state,
                pid: app.pid,
                restarts: 0,
                last_exit: None,
                usage: if app.state == AppState::Running {
                    self.usage
                } else {
                    AppUsage::default()
                },
            })
            .collect()
    }

    pub(super) fn stop_all(&self) {
        for app in lock(&self.apps).values_mut() {
            app.state = AppState::Stopped;
            app.pid = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{AppSpec, Runtime};
    use super::*;

    fn spec(name: &str, arg: &str) -> AppSpec {
        AppSpec {
            name: name.into(),
            command: vec!["sleep".into(), arg.into()],
            env: Default::default(),
            limits: Default::default(),
        }
    }

    #[tokio::test]
    async fn simulated_apps_run_at_once_and_restart_only_on_a_new_spec() {
        let usage = AppUsage {
            cpu_millis: 50,
            memory_mb: 32,
            ..Default::default()
        };
        let rt = Runtime::simulated(usage);
        rt.reconcile(vec![spec("a", "1"), spec("b", "1")])
            .await
            .unwrap();
        let first = rt.status();
        assert_eq!(first.len(), 2);
        assert!(first.iter().all(|s| s.state == AppState::Running
            && s.pid.is_some_and(|p| p >= FIRST_PID)
            && s.usage == usage));
        rt.reconcile(vec![spec("a", "1"), spec("b", "2")])
            .await
            .unwrap();
        let second = rt.status();
        assert_eq!(second[0].pid, first[0].pid, "unchanged app restarted");
        assert_ne!(second[1].pid, first[1].pid, "changed app kept its pid");
        rt.reconcile(vec![spec("b", "2")]).await.unwrap();
        assert_eq!(rt.status().len(), 1);
        rt.stop_all().await;
        assert!(rt.status().iter().all(|s| s.state == AppState::Stopped));
        // Invalid specs are refused as by the real runtime.
        assert!(rt.reconcile(vec![spec("B!", "1")]).await.is_err());
    }
}
