//! Manager configuration: a TOML file (every field optional, with the
//! default shown in `manager.example.toml`), then flags and environment
//! variables on top (see `cloud-manager serve --help`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use edgepool_common::logging::LogFormat;
use serde::Deserialize;

/// Upper bound of `events_per_tenant`: every tenant's ring is in memory and
/// copied (as pointers) when one of its events is recorded.
pub const MAX_EVENTS_PER_TENANT: u32 = 100_000;

/// Upper bound of `max_concurrent_handshakes` and
/// `max_concurrent_stream_opens`: beyond it a cap no longer shapes anything.
pub const MAX_CONCURRENT_OPENS: u32 = 65_536;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ManagerConfig {
    /// Address of the gRPC server (TLS always). Port 0 picks a free port.
    /// Default `127.0.0.1:7443`.
    pub listen: SocketAddr,
    /// Directory for the CA, the server certificate and the state file.
    /// Default `./edgepool-data`.
    pub data_dir: PathBuf,
    /// SPIFFE trust domain in every certificate's URI SAN.
    /// Default `edgepool.local`.
    pub trust_domain: String,
    /// DNS names and IP addresses put in the server certificate when it is
    /// created; agents and grpcurl must dial one of them. localhost,
    /// 127.0.0.1, ::1 and the host's name are always added.
    /// Default `["localhost", "127.0.0.1", "::1"]`.
    pub server_names: Vec<String>,
    /// Tenant of the client bundle (`tenant.pem`/`tenant.key`) created with
    /// the CA. Default `default`.
    pub default_tenant: String,
    /// Lifetime of a join token when the request does not say. Default 3600.
    pub token_default_ttl_seconds: u32,
    /// Longest lifetime a join token may ask for. Default 604800 (7 days).
    pub token_max_ttl_seconds: u32,
    /// Lifetime of a node identity certificate. Default 8760 (one year).
    pub node_cert_validity_hours: u32,
    /// How often agents send telemetry (told to them in the Welcome).
    /// Default 1000.
    pub telemetry_interval_ms: u32,
    /// How often agents send heartbeats on the stream. Default 1000.
    pub heartbeat_interval_ms: u32,
    /// Lifetime of pool member certificates; they are renewed over the
    /// stream when a third of it is left. Default 86400 (24 h).
    pub member_cert_validity_seconds: u32,
    /// How often the manager looks for member certificates to renew.
    /// Default 10000.
    pub member_cert_check_ms: u32,
    /// A connected member whose last message is older than this is
    /// suspect (a dropped stream is suspect at once). Default 3000.
    pub heartbeat_timeout_ms: u32,
    /// A suspect member is failed after this long (for a member its peers
    /// cannot reach: counted from their last successful probe). Default 1000.
    pub failure_grace_ms: u32,
    /// How often the failure detector looks at the members. Default 200.
    pub failure_check_ms: u32,
    /// Before failing a member over, ask the other members whether they
    /// still reach it; if one does, it is cut off from the cloud, not dead,
    /// and is not failed over. Default true.
    pub peer_confirmation: bool,
    /// How long to wait for the members' answers; a member that does not
    /// answer in time counts as "unknown", never as "down". Default 1000.
    pub peer_check_timeout_ms: u32,
    /// A member its peers cannot reach is pinged over its own stream; no
    /// answer and no other message from it by the end of its peers' grace
    /// (and at least this long) and it is failed over. Default 500.
    pub ping_timeout_ms: u32,
    /// After a member was found reachable by its peers, ask again this
    /// often while it stays cut off. Default 2000.
    pub peer_recheck_ms: u32,
    /// After the manager starts, a member it has not heard from since gets
    /// this long to connect before it can be failed over: a restarted
    /// manager is reached by its whole fleet over several seconds (agents
    /// back off up to 10 s), and a member not back yet is not dead (unless
    /// its peers report it unreachable). 0: no such grace. Default 15000.
    pub startup_grace_ms: u32,
    /// When at least this percentage of all pool members (and at least
    /// `failover_pause_min_members` of them) are not heard from at once (no
    /// stream, or heartbeats overdue), the manager takes it for a problem
    /// on its own side (its network, its load) rather than that many
    /// failures, and fails nobody over until fewer are. 100: pause only
    /// when every member is silent. Default 50.
    pub failover_pause_percent: u32,
    /// See `failover_pause_percent`: small fleets, where a few failures
    /// are a large share, never pause. Default 20.
    pub failover_pause_min_members: u32,
    /// How many events the manager keeps per tenant (the newest; each
    /// tenant has its own ring, so a busy tenant never pushes out another
    /// tenant's events). A `WatchEvents` resume from an older `after_seq`
    /// ends with DATA_LOSS. Memory: about 300 bytes per kept event.
    /// Default 1000.
    pub events_per_tenant: u32,
    /// TLS handshakes computing at once on the manager's port (after the
    /// client's hello: clients that have not sent it hold no slot). Above
    /// it, connections wait for a slot, so a fleet reconnecting at once
    /// (after a manager restart) is served at a steady rate instead of all
    /// at once. Up to max(16 x this, 4096) accepted connections wait; at
    /// that cap the oldest one silent for 1 s is closed to make room, and
    /// when every waiting client has spoken, new ones wait in the kernel's
    /// listen queue. Default 256.
    pub max_concurrent_handshakes: u32,
    /// A connection whose TLS handshake is not finished this long after it
    /// was accepted is closed, so a slow or silent client holds nothing
    /// for longer. Default 10000.
    pub handshake_timeout_ms: u32,
    /// `Enroll` calls per second from one source address (IPv6: one /64),
    /// after a burst of `enroll_burst`; above it `Enroll` answers
    /// RESOURCE_EXHAUSTED with a retry hint (`edge-agent join` waits and
    /// tries again). 0 = no limit. Default 10.
    pub enroll_rate_per_second: u32,
    /// `Enroll` calls one source may make at once before the rate applies.
    /// Default 20.
    pub enroll_burst: u32,
    /// Agent streams (`Connect`) being opened at once: from the stream's
    /// start until its hello is handled and recorded. Above it `Connect`
    /// answers RESOURCE_EXHAUSTED with a retry hint. Default 64.
    pub max_concurrent_stream_opens: u32,
    /// The retry hint of that RESOURCE_EXHAUSTED (agents wait this long
    /// plus a random part of up to as long again). Default 1000.
    pub stream_open_retry_ms: u32,
    /// Where the registry is kept: `redb` (the embedded `state.redb` in
    /// the data dir; one manager) or `etcd` (every record in etcd under
    /// `etcd_prefix`). Default `redb`.
    pub store: StoreKind,
    /// etcd endpoints (`http://host:port` or `https://host:port`) when
    /// `store = "etcd"`. Default none.
    pub etcd_endpoints: Vec<String>,
    /// Every key this manager keeps in etcd starts with this. Default
    /// `/edgepool`.
    pub etcd_prefix: String,
    /// CA certificate (PEM) of etcd's server certificate (https
    /// endpoints). Default none: the system's roots are not used; give it.
    pub etcd_ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's `--client-cert-auth`, with
    /// `etcd_key`. Default none.
    pub etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of `etcd_cert`. Default none.
    pub etcd_key: Option<PathBuf>,
    /// TTL of the lease by which this manager holds `etcd_prefix`: a
    /// manager cut off from etcd (or stalled) for this long can no longer
    /// write and stops, and a standby replica takes over. Default 4.
    pub etcd_lease_ttl_seconds: u32,
    /// Operations one etcd transaction may carry: etcd's own
    /// `--max-txn-ops` (128 unless the etcd server was started with
    /// another value). Default 128.
    pub etcd_max_txn_ops: u32,
    /// `HOST:PORT` at which the other replicas of an etcd prefix reach this
    /// manager: a standby forwards tenant and agent calls to the leader's
    /// advertised address. Default: the listen address, or this host's
    /// name with the listen port when `listen` is a wildcard address.
    pub advertise_address: Option<String>,
    /// Address of the web dashboard (HTTP; see `dashboard`), or `"off"`.
    /// A non-loopback address needs `http_tls = true`: the dashboard's
    /// login links and session cookies must not cross a network in clear.
    /// Port 0 picks a free port. Default `127.0.0.1:7480`.
    pub http_listen: HttpListen,
    /// Serve the dashboard over TLS (HTTPS) with the manager's server
    /// certificate. Default false.
    pub http_tls: bool,
    /// Address of the Prometheus metrics listener (plain HTTP, `GET
    /// /metrics` in the OpenMetrics text format). No TLS and no
    /// authentication: keep it on loopback or a network only your
    /// monitoring reaches. Port 0 picks a free port. Default none (off).
    pub metrics_listen: Option<SocketAddr>,
    /// Log output: `plain` or `json`. Default `plain`.
    pub log_format: LogFormat,
}

/// Where the web dashboard listens (`http_listen`): an address, or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpListen {
    Off,
    At(SocketAddr),
}

impl HttpListen {
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            HttpListen::Off => None,
            HttpListen::At(a) => Some(a),
        }
    }
}

impl std::str::FromStr for HttpListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(HttpListen::Off);
        }
        s.parse().map(HttpListen::At).map_err(|_| {
            format!("expected HOST:PORT (an IP address and a port) or \"off\", got {s:?}")
        })
    }
}

impl<'de> Deserialize<'de> for HttpListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The registry's storage backend (`store`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// `state.redb` in the data dir.
    #[default]
    Redb,
    /// An etcd cluster (`etcd_endpoints`).
    Etcd,
}

/// Where the dashboard listens unless configured otherwise.
pub const DEFAULT_HTTP_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7480);

/// Why `http_listen` is refused: the dashboard's login links and session
/// cookies are credentials, so it listens beyond loopback only over TLS.
pub fn check_http_listen(addr: SocketAddr, tls: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || tls {
        return Ok(());
    }
    Err(format!(
        "{addr} is not a loopback address, and the dashboard's login links and session \
         cookies must not cross a network in clear: set http_tls = true (--http-tls true) \
         to serve it over TLS with the manager's server certificate, or keep it on \
         127.0.0.1 (and reach it through an SSH tunnel or a TLS proxy), or turn it off \
         with http_listen = \"off\""
    ))
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            data_dir: PathBuf::from("./edgepool-data"),
            trust_domain: "edgepool.local".into(),
            server_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            default_tenant: "default".into(),
            token_default_ttl_seconds: 3600,
            token_max_ttl_seconds: 7 * 24 * 3600,
            node_cert_validity_hours: 24 * 365,
            telemetry_interval_ms: 1000,
            heartbeat_interval_ms: 1000,
            member_cert_validity_seconds: 24 * 3600,
            member_cert_check_ms: 10_000,
            heartbeat_timeout_ms: 3000,
            failure_grace_ms: 1000,
            failure_check_ms: 200,
            peer_confirmation: true,
            peer_check_timeout_ms: 1000,
            ping_timeout_ms: 500,
            peer_recheck_ms: 2000,
            startup_grace_ms: 15_000,
            failover_pause_percent: 50,
            failover_pause_min_members: 20,
            events_per_tenant: crate::events::DEFAULT_EVENTS_PER_TENANT as u32,
            max_concurrent_handshakes: 256,
            handshake_timeout_ms: 10_000,
            enroll_rate_per_second: 10,
            enroll_burst: 20,
            max_concurrent_stream_opens: 64,
            stream_open_retry_ms: 1000,
            store: StoreKind::Redb,
            etcd_endpoints: Vec::new(),
            etcd_prefix: "/edgepool".into(),
            etcd_ca_cert: None,
            etcd_cert: None,
            etcd_key: None,
            etcd_lease_ttl_seconds: 4,
            etcd_max_txn_ops: 128,
            advertise_address: None,
            http_listen: HttpListen::At(DEFAULT_HTTP_LISTEN),
            http_tls: false,
            metrics_listen: None,
            log_format: LogFormat::Plain,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {why}")]
    Invalid { field: &'static str, why: String },
}

impl ManagerConfig {
    /// Reads a TOML file. Unknown fields and wrong types are errors that
    /// name the field.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, why: &str| ConfigError::Invalid {
            field,
            why: why.to_string(),
        };
        edgepool_common::identity::validate_domain(&self.trust_domain)
            .map_err(|e| invalid("trust_domain", &e.to_string()))?;
        edgepool_common::identity::validate_name("tenant", &self.default_tenant)
            .map_err(|e| invalid("default_tenant", &e.to_string()))?;
        if self.server_names.is_empty() {
            return Err(invalid("server_names", "must name at least one host or IP"));
        }
        if self.token_default_ttl_seconds == 0 {
            return Err(invalid("token_default_ttl_seconds", "must be > 0"));
        }
        if self.token_max_ttl_seconds < self.token_default_ttl_seconds {
            return Err(invalid(
                "token_max_ttl_seconds",
                "must be >= token_default_ttl_seconds",
            ));
        }
        if self.node_cert_validity_hours == 0 {
            return Err(invalid("node_cert_validity_hours", "must be > 0"));
        }
        if self.member_cert_validity_seconds < 3 {
            return Err(invalid(
                "member_cert_validity_seconds",
                "must be at least 3",
            ));
        }
        if !(1..=100).contains(&self.failover_pause_percent) {
            return Err(invalid(
                "failover_pause_percent",
                "must be between 1 and 100",
            ));
        }
        if self.failover_pause_min_members == 0 {
            return Err(invalid("failover_pause_min_members", "must be at least 1"));
        }
        if self.member_cert_check_ms < 100 {
            return Err(invalid("member_cert_check_ms", "must be at least 100"));
        }
        for (field, v, min) in [
            ("heartbeat_timeout_ms", self.heartbeat_timeout_ms, 200),
            ("failure_grace_ms", self.failure_grace_ms, 0),
            ("failure_check_ms", self.failure_check_ms, 20),
            ("peer_check_timeout_ms", self.peer_check_timeout_ms, 50),
            ("ping_timeout_ms", self.ping_timeout_ms, 50),
            ("peer_recheck_ms", self.peer_recheck_ms, 100),
            ("startup_grace_ms", self.startup_grace_ms, 0),
            ("handshake_timeout_ms", self.handshake_timeout_ms, 100),
            ("stream_open_retry_ms", self.stream_open_retry_ms, 10),
        ] {
            if v < min || v > 600_000 {
                return Err(invalid(field, &format!("must be between {min} and 600000")));
            }
        }
        for (field, v) in [
            ("telemetry_interval_ms", self.telemetry_interval_ms),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
        ] {
            if !(100..=60_000).contains(&v) {
                return Err(invalid(field, "must be between 100 and 60000"));
            }
        }
        for (field, v) in [
            ("max_concurrent_handshakes", self.max_concurrent_handshakes),
            (
                "max_concurrent_stream_opens",
                self.max_concurrent_stream_opens,
            ),
        ] {
            if !(1..=MAX_CONCURRENT_OPENS).contains(&v) {
                return Err(invalid(
                    field,
                    &format!("must be between 1 and {MAX_CONCURRENT_OPENS}"),
                ));
            }
        }
        if self.enroll_rate_per_second > 100_000 {
            return Err(invalid(
                "enroll_rate_per_second",
                "must be at most 100000 (0 = no limit)",
            ));
        }
        if !(1..=100_000).contains(&self.enroll_burst) {
            return Err(invalid("enroll_burst", "must be between 1 and 100000"));
        }
        if self.store == StoreKind::Etcd {
            if self.etcd_endpoints.is_empty() {
                return Err(invalid(
                    "etcd_endpoints",
                    "store = \"etcd\" needs at least one endpoint (--etcd-endpoints http://HOST:2379)",
                ));
            }
            for e in &self.etcd_endpoints {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    return Err(invalid(
                        "etcd_endpoints",
                        &format!("{e:?} must start with http:// or https://"),
                    ));
                }
            }
            if self.etcd_cert.is_some() != self.etcd_key.is_some() {
                return Err(invalid("etcd_cert", "etcd_cert and etcd_key go together"));
            }
        }
        if !self.etcd_prefix.starts_with('/') || self.etcd_prefix.len() < 2 {
            return Err(invalid(
                "etcd_prefix",
                "must start with / and name something (e.g. /edgepool)",
            ));
        }
        if !(2..=3600).contains(&self.etcd_lease_ttl_seconds) {
            return Err(invalid(
                "etcd_lease_ttl_seconds",
                "must be between 2 and 3600",
            ));
        }
        if let Some(a) = &self.advertise_address {
            edgepool_common::tls::server_name_of(a).map_err(|_| {
                invalid(
                    "advertise_address",
                    "must be HOST:PORT (e.g. m1.example.net:7443)",
                )
            })?;
        }
        if !(8..=100_000).contains(&self.etcd_max_txn_ops) {
            return Err(invalid("etcd_max_txn_ops", "must be between 8 and 100000"));
        }
        if let HttpListen::At(addr) = self.http_listen {
            check_http_listen(addr, self.http_tls).map_err(|why| invalid("http_listen", &why))?;
        }
        if !(1..=MAX_EVENTS_PER_TENANT).contains(&self.events_per_tenant) {
            return Err(invalid(
                "events_per_tenant",
                &format!("must be between 1 and {MAX_EVENTS_PER_TENANT}"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(
            ManagerConfig::from_toml("").unwrap(),
            ManagerConfig::default()
        );
    }

    #[test]
    fn example_file_parses_and_matches_defaults() {
        let text = include_str!("../manager.example.toml");
        let c = ManagerConfig::from_toml(text).unwrap();
        assert_eq!(c, ManagerConfig::default());
        c.validate().unwrap();
    }

    #[test]
    fn advertise_address_must_be_host_and_port() {
        let bad = ManagerConfig::from_toml("advertise_address = \"m1.example.net\"").unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("advertise_address"), "{err}");
        let good = ManagerConfig::from_toml("advertise_address = \"m1.example.net:7443\"").unwrap();
        good.validate().unwrap();
    }

    #[test]
    fn dashboard_off_loopback_or_tls_only() {
        let off = ManagerConfig::from_toml("http_listen = \"off\"").unwrap();
        assert_eq!(off.http_listen, HttpListen::Off);
        off.validate().unwrap();
        let open = ManagerConfig::from_toml("http_listen = \"0.0.0.0:7480\"").unwrap();
        let err = open.validate().unwrap_err().to_string();
        assert!(
            err.contains("http_listen") && err.contains("http_tls"),
            "{err}"
        );
        let tls =
            ManagerConfig::from_toml("http_listen = \"0.0.0.0:7480\"\nhttp_tls = true").unwrap();
        tls.validate().unwrap();
        let err = ManagerConfig::from_toml("http_listen = \"localhost\"").unwrap_err();
        assert!(err.contains("http_listen"), "{err}");
    }

    #[test]
    fn unknown_field_is_named() {
        let err = ManagerConfig::from_toml("listne = \"1.2.3.4:5\"").unwrap_err();
        assert!(err.contains("listne"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = ManagerConfig::from_toml("telemetry_interval_ms = \"fast\"").unwrap_err();
        assert!(err.contains("telemetry_interval_ms"), "{err}");
        let err = ManagerConfig::from_toml("listen = \"nowhere\"").unwrap_err();
        assert!(err.contains("listen"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let mut c = ManagerConfig {
            telemetry_interval_ms: 5,
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("telemetry_interval_ms")
        );
        c = ManagerConfig {
            events_per_tenant: 0,
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("events_per_tenant")
        );
        c = ManagerConfig {
            max_concurrent_handshakes: 0,
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("max_concurrent_handshakes")
        );
        c = ManagerConfig {
            trust_domain: "Bad Domain".into(),
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("trust_domain")
        );
    }
}
