//! Reaching etcd with the etcd-client crate (built from `vendor/etcd-client`,
//! whose build script uses protox: no system protoc is needed): the
//! connection options the manager takes, and the paged read of a prefix.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

pub use etcd_client::KeyValue;

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

/// An etcd call that failed (what etcd-client said, or what was wrong
/// locally).
pub type Error = String;

/// A client over every endpoint (requests are spread over those that
/// answer). Connects lazily: the first request says whether etcd is there.
/// Call it on a tokio runtime (the client's channel runs a task there).
pub async fn connect(c: &Connect) -> Result<Client, Error> {
    if c.endpoints.is_empty() {
        return Err("no etcd endpoint given".into());
    }
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(c.timeout)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(false);
    if let Some(tls) = tls(c)? {
        options = options.with_tls(tls);
    }
    Client::connect(&c.endpoints, Some(options))
        .await
        .map_err(|e| format!("etcd at {}: {e}", c.endpoints.join(",")))
}

/// Every row under `prefix`, `page` rows per request.
pub async fn prefix(client: &Client, prefix: &str, page: i64) -> Result<Vec<KeyValue>, Error> {
    let mut kv = client.kv_client();
    let end = prefix_end(prefix.as_bytes());
    let mut out = Vec::new();
    let mut next = prefix.as_bytes().to_vec();
    loop {
        let options = GetOptions::new().with_range(end.clone()).with_limit(page);
        let mut resp = kv
            .get(next.clone(), Some(options))
            .await
            .map_err(|e| e.to_string())?;
        let more = resp.more();
        let kvs = resp.take_kvs();
        let last = kvs.last().map(|kv| kv.key().to_vec());
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

fn tls(c: &Connect) -> Result<Option<TlsOptions>, Error> {
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
    let mut tls = TlsOptions::new();
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
