//! A small client of the etcd v3 API: what the etcd store needs (ranges,
//! transactions, leases), over tonic with the code generated from
//! `proto/etcd` by `build.rs` (protox; no system protoc, unlike the
//! etcd-client crate, whose build needs one).

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The generated etcd API (packages `etcdserverpb`, `mvccpb`, `authpb`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
}

use pb::etcdserverpb as rpc;
use rpc::compare::{CompareResult, CompareTarget, TargetUnion};
use rpc::kv_client::KvClient;
use rpc::lease_client::LeaseClient;
use rpc::request_op::Request;
use rpc::response_op::Response;

pub use pb::mvccpb::KeyValue;
pub use rpc::{Compare, RequestOp, TxnRequest, TxnResponse};

/// How to reach etcd.
#[derive(Clone, Debug, Default)]
pub struct Connect {
    /// `http://host:port` or `https://host:port`, one or more.
    pub endpoints: Vec<String>,
    /// CA certificate (PEM) of etcd's server certificate.
    pub ca_cert: Option<PathBuf>,
    /// Client certificate and key (PEM).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Per request.
    pub timeout: Duration,
}

#[derive(Clone)]
pub struct Etcd {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
}

/// An etcd call that failed (its gRPC status, or what was wrong locally).
pub type Error = String;

impl Etcd {
    /// A client over every endpoint (requests are spread over those that
    /// answer). Connects lazily: the first request says whether etcd is
    /// there.
    pub fn connect(c: &Connect) -> Result<Etcd, Error> {
        if c.endpoints.is_empty() {
            return Err("no etcd endpoint given".into());
        }
        let tls = tls(c)?;
        let mut endpoints = Vec::new();
        for url in &c.endpoints {
            let mut e = Endpoint::from_shared(url.clone())
                .map_err(|e| format!("bad etcd endpoint {url:?}: {e}"))?
                .connect_timeout(Duration::from_secs(5))
                .timeout(c.timeout)
                .http2_keep_alive_interval(Duration::from_secs(2))
                .keep_alive_timeout(Duration::from_secs(2))
                .tcp_nodelay(true);
            if let Some(tls) = &tls {
                e = e
                    .tls_config(tls.clone())
                    .map_err(|e| format!("etcd TLS for {url}: {e}"))?;
            }
            endpoints.push(e);
        }
        let channel = Channel::balance_list(endpoints.into_iter());
        Ok(Etcd {
            kv: KvClient::new(channel.clone()),
            lease: LeaseClient::new(channel),
        })
    }

    /// Keys in `[key, range_end)` (`range_end` empty: `key` alone), at
    /// most `limit` (0: all). Returns the rows and whether more follow.
    pub async fn range(
        &self,
        key: &[u8],
        range_end: &[u8],
        limit: i64,
        keys_only: bool,
    ) -> Result<(Vec<KeyValue>, bool), Error> {
        let resp = self
            .kv
            .clone()
            .range(rpc::RangeRequest {
                key: key.to_vec(),
                range_end: range_end.to_vec(),
                limit,
                keys_only,
                ..Default::default()
            })
            .await
            .map_err(status)?
            .into_inner();
        Ok((resp.kvs, resp.more))
    }

    /// Every row under `prefix` (paged by `page`).
    pub async fn prefix(&self, prefix: &str, page: i64) -> Result<Vec<KeyValue>, Error> {
        let end = prefix_end(prefix.as_bytes());
        let mut out = Vec::new();
        let mut next = prefix.as_bytes().to_vec();
        loop {
            let (kvs, more) = self.range(&next, &end, page, false).await?;
            let last = kvs.last().map(|kv| kv.key.clone());
            out.extend(kvs);
            match last {
                Some(mut k) if more => {
                    k.push(0);
                    next = k;
                }
                _ => return Ok(out),
            }
        }
    }

    pub async fn txn(&self, txn: TxnRequest) -> Result<TxnResponse, Error> {
        Ok(self.kv.clone().txn(txn).await.map_err(status)?.into_inner())
    }

    pub async fn put(&self, key: &str, value: &[u8]) -> Result<(), Error> {
        self.kv
            .clone()
            .put(rpc::PutRequest {
                key: key.as_bytes().to_vec(),
                value: value.to_vec(),
                ..Default::default()
            })
            .await
            .map_err(status)?;
        Ok(())
    }

    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        self.kv
            .clone()
            .delete_range(rpc::DeleteRangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            })
            .await
            .map_err(status)?;
        Ok(())
    }

    /// A new lease of `ttl` seconds; its id.
    pub async fn lease_grant(&self, ttl: i64) -> Result<i64, Error> {
        let resp = self
            .lease
            .clone()
            .lease_grant(rpc::LeaseGrantRequest { ttl, id: 0 })
            .await
            .map_err(status)?
            .into_inner();
        if !resp.error.is_empty() {
            return Err(resp.error);
        }
        Ok(resp.id)
    }

    pub async fn lease_revoke(&self, id: i64) -> Result<(), Error> {
        self.lease
            .clone()
            .lease_revoke(rpc::LeaseRevokeRequest { id })
            .await
            .map_err(status)?;
        Ok(())
    }

    /// Renews lease `id` once; its remaining TTL (0 or less: it is gone).
    pub async fn keep_alive_once(&self, id: i64) -> Result<i64, Error> {
        let request = tokio_stream::once(rpc::LeaseKeepAliveRequest { id });
        let mut answers = self
            .lease
            .clone()
            .lease_keep_alive(request)
            .await
            .map_err(status)?
            .into_inner();
        match answers.message().await.map_err(status)? {
            Some(r) => Ok(r.ttl),
            None => Err("etcd ended the keep-alive stream without an answer".into()),
        }
    }
}

fn status(s: tonic::Status) -> Error {
    if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        format!("{:?}: {}", s.code(), s.message())
    }
}

fn tls(c: &Connect) -> Result<Option<ClientTlsConfig>, Error> {
    let read =
        |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let https = c.endpoints.iter().any(|e| e.starts_with("https://"));
    if !https {
        if c.ca_cert.is_some() || c.cert.is_some() {
            return Err(
                "etcd TLS options were given but no endpoint is https:// (give https://HOST:2379)"
                    .into(),
            );
        }
        return Ok(None);
    }
    let mut tls = ClientTlsConfig::new();
    match &c.ca_cert {
        Some(ca) => tls = tls.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => {
            return Err(
                "https:// etcd endpoints need the CA of etcd's server certificate (--etcd-ca-cert)"
                    .into(),
            );
        }
    }
    match (&c.cert, &c.key) {
        (Some(cert), Some(key)) => tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?)),
        (None, None) => {}
        _ => return Err("--etcd-cert and --etcd-key go together".into()),
    }
    Ok(Some(tls))
}

/// The smallest key after every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// `key`'s create revision is `revision` (0: the key does not exist).
pub fn created_at(key: &str, revision: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(TargetUnion::CreateRevision(revision)),
        range_end: Vec::new(),
    }
}

/// `key`'s value is `value`.
pub fn value_is(key: &str, value: &[u8]) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Value as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(TargetUnion::Value(value.to_vec())),
        range_end: Vec::new(),
    }
}

pub fn put(key: &str, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(rpc::PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease,
            ..Default::default()
        })),
    }
}

pub fn delete(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(rpc::DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })),
    }
}

pub fn get(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(rpc::RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })),
    }
}

/// The rows the transaction's range operations returned.
pub fn ranged(resp: &TxnResponse) -> impl Iterator<Item = &KeyValue> {
    resp.responses.iter().flat_map(|r| match &r.response {
        Some(Response::ResponseRange(range)) => range.kvs.as_slice(),
        _ => &[],
    })
}

/// The revision etcd was at after the transaction.
pub fn revision(resp: &TxnResponse) -> i64 {
    resp.header.as_ref().map_or(0, |h| h.revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_just_past_the_prefix() {
        assert_eq!(prefix_end(b"/e/nodes/"), b"/e/nodes0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
    }

    #[test]
    fn tls_options_need_https_and_https_needs_a_ca() {
        let mut c = Connect {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            ca_cert: Some("/x".into()),
            ..Connect::default()
        };
        assert!(tls(&c).unwrap_err().contains("https://"));
        c.endpoints = vec!["https://127.0.0.1:2379".into()];
        c.ca_cert = None;
        assert!(tls(&c).unwrap_err().contains("--etcd-ca-cert"));
    }
}
