//! `TenantService`: thin handlers (authenticate, validate, call the
//! manager, map errors).

use std::sync::Arc;

use edgepool_common::proto as pb;
use pb::tenant_service_server::TenantService;
use tonic::{Request, Response, Status};

use std::pin::Pin;

use futures::Stream;
use tokio_util::sync::CancellationToken;

use crate::auth::{Trust, caller, tenant_caller};
use crate::convert::{page_token, timestamp};
use crate::dashboard::Links;
use crate::errors::to_status;
use crate::events::WatchFrom;
use crate::manager::Manager;
use crate::node_list::NodeQuery;
use crate::pool::{AppDef, PolicyDef};
use crate::pools::PoolRequest;

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

/// Largest number of apps one request may carry.
const MAX_APPS: usize = 1000;
/// Largest number of nodes in one pool.
const MAX_NODES: usize = 1000;

pub(crate) fn apps_from(apps: Vec<pb::AppSpec>) -> Result<Vec<AppDef>, Status> {
    if apps.len() > MAX_APPS {
        return Err(Status::invalid_argument(format!(
            "apps: at most {MAX_APPS} apps per pool"
        )));
    }
    Ok(apps.into_iter().map(AppDef::from).collect())
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field}: required")));
    }
    Ok(())
}

/// How often a running WatchEvents looks its certificate up in the
/// revocation list.
pub(crate) const REVOCATION_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

pub struct TenantApi {
    manager: Arc<Manager>,
    trust: Trust,
    /// Fires when the manager stops: open event streams then end with
    /// `UNAVAILABLE` instead of holding the graceful drain open.
    shutdown: CancellationToken,
    /// Mints dashboard login links (None: the dashboard is off).
    dashboard: Option<Arc<Links>>,
}

impl TenantApi {
    pub fn new(manager: Arc<Manager>, trust: Trust, shutdown: CancellationToken) -> Self {
        TenantApi {
            manager,
            trust,
            shutdown,
            dashboard: None,
        }
    }

    /// Answers `CreateDashboardLogin` with links of this dashboard.
    pub fn with_dashboard(mut self, links: Option<Arc<Links>>) -> Self {
        self.dashboard = links;
        self
    }

    fn tenant<T>(&self, request: &Request<T>) -> Result<String, Status> {
        tenant_caller(request, &self.trust)
    }
}

#[tonic::async_trait]
impl TenantService for TenantApi {
    #[tracing::instrument(skip_all)]
    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let req = request.into_inner();
        let (token, expires) = self
            .manager
            .enrollment()
            .create_token(&tenant, req.ttl_seconds, req.labels.into_iter().collect())
            .await
            .map_err(to_status)?;
        tracing::info!(%tenant, "join token created");
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token,
            expires_at: Some(timestamp(expires)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let query = NodeQuery::try_from(request.into_inner()).map_err(to_status)?;
        let page = self
            .manager
            .nodes()
            .list_nodes_page(&tenant, &query)
            .map_err(to_status)?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: page.nodes.iter().map(pb::Node::from).collect(),
            next_page_token: page
                .next_after
                .as_deref()
                .map(page_token)
                .unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn node_summary(
        &self,
        request: Request<pb::NodeSummaryRequest>,
    ) -> Result<Response<pb::NodeSummaryResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let pool = request.into_inner().pool;
        let counts = self
            .manager
            .nodes()
            .node_summary(&tenant, Some(pool.as_str()).filter(|p| !p.is_empty()))
            .map_err(to_status)?;
        Ok(Response::new(counts.into()))
    }

    #[tracing::instrument(skip_all)]
    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let tenant = self.tenant(&request)?;
        let req = request.into_inner();
        if req.node_id.is_empty() {
            return Err(Status::invalid_argument("node_id is required"));
        }
        let node = self
            .manager
            .nodes()
            .get_node(&tenant, &req.node_id)
            .map_err(to_status)?;
        Ok(Response::new(pb::Node::from(&node)))
    }

    #[tracing::instrument(skip_all)]
    async fn create_pool(
        &self,
        request: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let tenant = self.tenant(&request)?;
        let req = request.into_inner();
        if req.node_ids.len() > MAX_NODES {
            return Err(Status::invalid_argument(format!(
                "node_ids: at most {MAX_NODES} nodes per pool"
            )));
        }
        let policy = req
            .policy
            .map(PolicyDef::try_from)
            .transpose()
            .map_err(|e| to_status(e.into()))?;
        let pool_req = PoolRequest {
            name: req.name,
            node_ids: req.node_ids,
            apps: apps_from(req.apps)?,
            policy,
            spare_labels: req.spare_labels.into_iter().collect(),
        };
        let manager = self.manager.clone();
        // Key generation, signing and the fsync'd write are blocking work.
        let pool =
            tokio::task::spawn_blocking(move || manager.pools().create_pool(&tenant, pool_req))
                .await
                .map_err(|_| Status::internal("internal error"))?
                .map_err(to_status)?;
        Ok(Response::new(pb::Pool::from(&pool)))
    }

    #[tracing::instrument(skip_all)]
    async fn get_pool(
        &self,
        request: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let tenant = self.tenant(&request)?;
        let name = request.into_inner().name;
        required("name", &name)?;
        let pool = self
            .manager
            .pools()
            .get_pool(&tenant, &name)
            .map_err(to_status)?;
        Ok(Response::new(pb::Pool::from(&pool)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_pools(
        &self,
        request: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let pools = self
            .manager
            .pools()
            .list_pools(&tenant)
            .map_err(to_status)?;
        Ok(Response::new(pb::ListPoolsResponse {
            pools: pools.iter().map(pb::Pool::from).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_pool(
        &self,
        request: Request<pb::DeletePoolRequest>,
    ) -> Result<Response<pb::DeletePoolResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let name = request.into_inner().name;
        required("name", &name)?;
        let manager = self.manager.clone();
        tokio::task::spawn_blocking(move || manager.pools().delete_pool(&tenant, &name))
            .await
            .map_err(|_| Status::internal("internal error"))?
            .map_err(to_status)?;
        Ok(Response::new(pb::DeletePoolResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn update_apps(
        &self,
        request: Request<pb::UpdateAppsRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let tenant = self.tenant(&request)?;
        let req = request.into_inner();
        required("pool", &req.pool)?;
        let apps = apps_from(req.apps)?;
        let manager = self.manager.clone();
        let pool = tokio::task::spawn_blocking(move || {
            manager.pools().update_apps(&tenant, &req.pool, apps)
        })
        .await
        .map_err(|_| Status::internal("internal error"))?
        .map_err(to_status)?;
        Ok(Response::new(pb::Pool::from(&pool)))
    }

    #[tracing::instrument(skip_all)]
    async fn update_policy(
        &self,
        request: Request<pb::UpdatePolicyRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let tenant = self.tenant(&request)?;
        let req = request.into_inner();
        required("pool", &req.pool)?;
        let policy = req
            .policy
            .ok_or_else(|| Status::invalid_argument("policy: required"))
            .and_then(|p| PolicyDef::try_from(p).map_err(|e| to_status(e.into())))?;
        let manager = self.manager.clone();
        let pool = tokio::task::spawn_blocking(move || {
            manager.pools().update_policy(&tenant, &req.pool, policy)
        })
        .await
        .map_err(|_| Status::internal("internal error"))?
        .map_err(to_status)?;
        Ok(Response::new(pb::Pool::from(&pool)))
    }

    #[tracing::instrument(skip_all)]
    async fn create_dashboard_login(
        &self,
        request: Request<pb::CreateDashboardLoginRequest>,
    ) -> Result<Response<pb::CreateDashboardLoginResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let ttl = request.into_inner().ttl_seconds;
        let links = self.dashboard.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "the dashboard is off on this manager (http_listen = \"off\")",
            )
        })?;
        let (url, expires) = links
            .login_url(&tenant, ttl)
            .map_err(|why| Status::invalid_argument(format!("ttl_seconds: {why}")))?;
        tracing::info!(%tenant, "dashboard login link created");
        Ok(Response::new(pb::CreateDashboardLoginResponse {
            url,
            expires_at: Some(timestamp(expires)),
        }))
    }

    type WatchEventsStream = EventStream;

    #[tracing::instrument(skip_all)]
    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let tenant = self.tenant(&request)?;
        let serial = caller(&request, &self.trust)?.serial;
        let req = request.into_inner();
        // from_start asks for whatever is kept, so it is never a loss;
        // after_seq asks for everything after it, so it can be.
        let from = if req.from_start {
            WatchFrom::Kept {
                after: req.after_seq,
            }
        } else if req.after_seq > 0 {
            WatchFrom::After(req.after_seq)
        } else {
            WatchFrom::Now
        };
        let mut watch = self
            .manager
            .control()
            .watch_events(&tenant, &req.pool, from)
            .map_err(to_status)?;
        let manager = self.manager.clone();
        let shutdown = self.shutdown.clone();
        let trust = self.trust.clone();
        let pool = req.pool;
        let stream = async_stream(move |tx| async move {
            // A watch outlives its handshake: its certificate is looked
            // up in the revocation list again every second.
            let mut recheck = tokio::time::interval(REVOCATION_RECHECK);
            let end = loop {
                let next = tokio::select! {
                    next = manager.control().next_event(&mut watch) => next,
                    _ = shutdown.cancelled() => {
                        let msg = format!(
                            "manager is shutting down; resume with after_seq={}",
                            watch.position()
                        );
                        let _ = tx.send(Err(Status::unavailable(msg))).await;
                        break "manager shutting down";
                    }
                    // The client went away: end now, not at the next event
                    // (which may never come, e.g. for a pool that does not
                    // exist).
                    _ = tx.closed() => break "client gone",
                    _ = recheck.tick() => {
                        if trust.is_revoked(&serial) {
                            let msg = "the tenant certificate of this watch has been revoked";
                            let _ = tx.send(Err(Status::permission_denied(msg))).await;
                            break "certificate revoked";
                        }
                        continue;
                    }
                };
                match next {
                    Ok(Some(e)) => {
                        if tx.send(Ok(pb::Event::from(&*e))).await.is_err() {
                            break "client gone";
                        }
                    }
                    Ok(None) => break "manager stopped",
                    Err(e) => {
                        let _ = tx.send(Err(to_status(e))).await;
                        break "events dropped";
                    }
                }
            };
            tracing::info!(%tenant, %pool, reason = end, "event watch ended");
        });
        Ok(Response::new(stream))
    }
}

/// A response stream fed by a task through a small channel; the task ends
/// when the client goes away (the channel closes).
fn async_stream<F, Fut>(f: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::Event, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
