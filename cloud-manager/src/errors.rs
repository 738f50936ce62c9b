//! The one mapping from domain errors to gRPC status codes.

use tonic::Status;

use crate::control::ManagerError;
use crate::pool::PoolError;
use crate::registry::EnrollError;

pub fn to_status(e: ManagerError) -> Status {
    match e {
        ManagerError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        ManagerError::Enroll(ref inner) => match inner {
            EnrollError::MalformedToken | EnrollError::BadNodeId(_) => {
                Status::invalid_argument(e.to_string())
            }
            EnrollError::UnknownToken | EnrollError::ExpiredToken | EnrollError::UsedToken(_) => {
                Status::unauthenticated(e.to_string())
            }
            EnrollError::NodeExists(_) => Status::already_exists(e.to_string()),
        },
        ManagerError::Ca(crate::ca::CaError::BadCsr(_)) => Status::invalid_argument(e.to_string()),
        ManagerError::Pool(ref inner) => match inner {
            PoolError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            PoolError::Precondition { .. } => Status::failed_precondition(e.to_string()),
            PoolError::NotFound(_) => Status::not_found(e.to_string()),
        },
        ManagerError::NotFound(m) => Status::not_found(m),
        ManagerError::EventsDropped(_) => Status::data_loss(e.to_string()),
        ManagerError::PermissionDenied(m) => Status::permission_denied(m),
        // The node changed under the request (checks are made first).
        ManagerError::Transition(_) => Status::failed_precondition(e.to_string()),
        ManagerError::Store(_) | ManagerError::Ca(_) | ManagerError::Poisoned => {
            // Details go to the log, not to the caller.
            tracing::error!(error = %e, "internal error");
            Status::internal("internal error")
        }
    }
}
