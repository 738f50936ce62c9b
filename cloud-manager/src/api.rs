//! `TenantService`: thin handlers (authenticate, validate, call the
//! manager, map errors).

use std::sync::Arc;

use edgepool_common::proto as pb;
use pb::tenant_service_server::TenantService;
use tonic::{Request, Response, Status};

use crate::auth::tenant_caller;
use crate::convert::timestamp;
use crate::errors::to_status;
use crate::manager::Manager;

pub struct TenantApi {
    manager: Arc<Manager>,
}

impl TenantApi {
    pub fn new(manager: Arc<Manager>) -> Self {
        TenantApi { manager }
    }

    fn tenant<T>(&self, request: &Request<T>) -> Result<String, Status> {
        tenant_caller(request, self.manager.trust_domain())
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
            .create_token(&tenant, req.ttl_seconds, req.labels.into_iter().collect())
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
        let nodes = self.manager.list_nodes(&tenant).map_err(to_status)?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.iter().map(pb::Node::from).collect(),
        }))
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
            .get_node(&tenant, &req.node_id)
            .map_err(to_status)?;
        Ok(Response::new(pb::Node::from(&node)))
    }
}
