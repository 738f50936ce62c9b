//! Integration tests: real daemons, real TLS, real processes.

mod api_docs;
mod auth;
mod cli;
mod detection;
mod dev;
mod dev_replicas;
mod docs;
mod edgectl;
mod enrollment;
mod etcd_store;
mod events;
mod failover;
mod grpcurl;
mod install;
mod manager_list;
mod node_list;
mod offload;
mod offload_faults;
mod packaging;
mod peers;
mod pools;
mod replicas;
mod scale;
mod storm;
mod stream;
mod swarm;
