//! Command line of `cloud-manager`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use edgepool_common::logging::LogFormat;

use crate::config::{HttpListen, ManagerConfig, StoreKind};

#[derive(Debug, Parser)]
#[command(
    name = "cloud-manager",
    version,
    about = "edgepool cloud manager: the certificate authority, enrollment, agent streams and the tenant API",
    after_help = "New here? `cloud-manager dev` starts a manager and 4 local agents and prints what to try."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the manager daemon (creates the CA in the data dir on first start).
    Serve(Box<ServeArgs>),
    /// Create the root CA, the server certificate and the first tenant
    /// client bundle (tenant.pem, tenant.key) in a directory.
    Init(InitArgs),
    /// Issue another tenant client bundle from an existing CA.
    TenantBundle(TenantBundleArgs),
    /// Tenant client certificates: `tenant revoke`.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Node identity certificates: `node revoke`.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Run a manager and K local agents in one command, for trying things
    /// out; Ctrl-C stops every process it started.
    Dev(DevArgs),
    /// Print the root CA's fingerprint (what `edge-agent join
    /// --ca-fingerprint` takes) from a data dir.
    Fingerprint(FingerprintArgs),
    /// Run the edge agent built into this binary (same commands as the
    /// `edge-agent` binary; `dev` uses it for its local agents).
    Agent {
        #[command(subcommand)]
        command: edge_agent::cli::Command,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (see manager.example.toml); flags and env override it.
    #[arg(long, short, env = "EDGEPOOL_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address (default 127.0.0.1:7443; port 0 = any free port).
    #[arg(long, env = "EDGEPOOL_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Data directory: CA, server certificate, state (default ./edgepool-data).
    #[arg(long, env = "EDGEPOOL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// SPIFFE trust domain (default edgepool.local).
    #[arg(long, env = "EDGEPOOL_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// Host name or IP for the server certificate (repeat; used when the CA
    /// is created; localhost, 127.0.0.1, ::1 and this host's name are always
    /// included).
    #[arg(
        long = "server-name",
        env = "EDGEPOOL_SERVER_NAMES",
        value_delimiter = ','
    )]
    pub server_names: Vec<String>,
    /// Tenant of the first client bundle (default `default`).
    #[arg(long, env = "EDGEPOOL_DEFAULT_TENANT")]
    pub default_tenant: Option<String>,
    /// Join token lifetime when a request does not say (seconds).
    #[arg(long, env = "EDGEPOOL_TOKEN_DEFAULT_TTL_SECONDS")]
    pub token_default_ttl_seconds: Option<u32>,
    /// Longest join token lifetime a request may ask for (seconds).
    #[arg(long, env = "EDGEPOOL_TOKEN_MAX_TTL_SECONDS")]
    pub token_max_ttl_seconds: Option<u32>,
    /// Lifetime of node identity certificates (hours).
    #[arg(long, env = "EDGEPOOL_NODE_CERT_VALIDITY_HOURS")]
    pub node_cert_validity_hours: Option<u32>,
    /// Telemetry period agents are told to use (ms).
    #[arg(long, env = "EDGEPOOL_TELEMETRY_INTERVAL_MS")]
    pub telemetry_interval_ms: Option<u32>,
    /// Heartbeat period agents are told to use (ms).
    #[arg(long, env = "EDGEPOOL_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u32>,
    /// Lifetime of pool member certificates (seconds).
    #[arg(long, env = "EDGEPOOL_MEMBER_CERT_VALIDITY_SECONDS")]
    pub member_cert_validity_seconds: Option<u32>,
    /// How often to look for member certificates to renew (ms).
    #[arg(long, env = "EDGEPOOL_MEMBER_CERT_CHECK_MS")]
    pub member_cert_check_ms: Option<u32>,
    /// Heartbeats overdue by this long make a member suspect (ms).
    #[arg(long, env = "EDGEPOOL_HEARTBEAT_TIMEOUT_MS")]
    pub heartbeat_timeout_ms: Option<u32>,
    /// A suspect member is failed over after this long (ms).
    #[arg(long, env = "EDGEPOOL_FAILURE_GRACE_MS")]
    pub failure_grace_ms: Option<u32>,
    /// After start (or taking over as leader), a member not heard from yet
    /// is not failed over for this long (ms; 0 = no grace).
    #[arg(long, env = "EDGEPOOL_STARTUP_GRACE_MS")]
    pub startup_grace_ms: Option<u32>,
    /// How often the failure detector runs (ms).
    #[arg(long, env = "EDGEPOOL_FAILURE_CHECK_MS")]
    pub failure_check_ms: Option<u32>,
    /// Ask the other members before failing one over (true/false).
    #[arg(long, env = "EDGEPOOL_PEER_CONFIRMATION")]
    pub peer_confirmation: Option<bool>,
    /// How long to wait for the members' answers (ms).
    #[arg(long, env = "EDGEPOOL_PEER_CHECK_TIMEOUT_MS")]
    pub peer_check_timeout_ms: Option<u32>,
    /// How long a member its peers cannot reach gets to answer the
    /// manager's ping before it is failed over (ms).
    #[arg(long, env = "EDGEPOOL_PING_TIMEOUT_MS")]
    pub ping_timeout_ms: Option<u32>,
    /// How often to ask again about a member its peers still reach (ms).
    #[arg(long, env = "EDGEPOOL_PEER_RECHECK_MS")]
    pub peer_recheck_ms: Option<u32>,
    /// Events kept per tenant (the newest).
    #[arg(long, env = "EDGEPOOL_EVENTS_PER_TENANT")]
    pub events_per_tenant: Option<u32>,
    /// TLS handshakes computing at once; more connections wait.
    #[arg(long, env = "EDGEPOOL_MAX_CONCURRENT_HANDSHAKES")]
    pub max_concurrent_handshakes: Option<u32>,
    /// A connection not through its TLS handshake in this time is closed
    /// (ms).
    #[arg(long, env = "EDGEPOOL_HANDSHAKE_TIMEOUT_MS")]
    pub handshake_timeout_ms: Option<u32>,
    /// Enroll calls per second from one source address (0 = no limit).
    #[arg(long, env = "EDGEPOOL_ENROLL_RATE_PER_SECOND")]
    pub enroll_rate_per_second: Option<u32>,
    /// Enroll calls one source address may make at once.
    #[arg(long, env = "EDGEPOOL_ENROLL_BURST")]
    pub enroll_burst: Option<u32>,
    /// Agent streams being opened at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "EDGEPOOL_MAX_CONCURRENT_STREAM_OPENS")]
    pub max_concurrent_stream_opens: Option<u32>,
    /// Retry hint sent with that RESOURCE_EXHAUSTED (ms).
    #[arg(long, env = "EDGEPOOL_STREAM_OPEN_RETRY_MS")]
    pub stream_open_retry_ms: Option<u32>,
    /// Where the registry is kept: redb (state.redb in the data dir) or
    /// etcd (--etcd-endpoints).
    #[arg(long, env = "EDGEPOOL_STORE")]
    pub store: Option<StoreKind>,
    /// etcd endpoints, comma-separated (http://HOST:2379 or https://...).
    #[arg(long, env = "EDGEPOOL_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of this manager's records in etcd (default /edgepool).
    #[arg(long, env = "EDGEPOOL_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
    /// CA certificate (PEM) that signed etcd's server certificate.
    #[arg(long, env = "EDGEPOOL_ETCD_CA_CERT")]
    pub etcd_ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for etcd, with --etcd-key.
    #[arg(long, env = "EDGEPOOL_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert.
    #[arg(long, env = "EDGEPOOL_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// TTL of the etcd lease by which this manager holds its prefix (s).
    #[arg(long, env = "EDGEPOOL_ETCD_LEASE_TTL_SECONDS")]
    pub etcd_lease_ttl_seconds: Option<u32>,
    /// Operations per etcd transaction at most (etcd's --max-txn-ops).
    #[arg(long, env = "EDGEPOOL_ETCD_MAX_TXN_OPS")]
    pub etcd_max_txn_ops: Option<u32>,
    /// HOST:PORT at which other replicas reach this manager (default: the
    /// listen address, or this host's name when listening on all addresses).
    #[arg(long, env = "EDGEPOOL_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,
    /// Web dashboard address, or `off` (default 127.0.0.1:7480; port 0 =
    /// any free port). Non-loopback needs --http-tls true.
    #[arg(long, env = "EDGEPOOL_HTTP_LISTEN", value_name = "ADDR|off")]
    pub http_listen: Option<HttpListen>,
    /// Serve the dashboard over TLS with the manager's server certificate.
    #[arg(long, env = "EDGEPOOL_HTTP_TLS")]
    pub http_tls: Option<bool>,
    /// Log format: plain or json (RUST_LOG sets the filter).
    #[arg(long, env = "EDGEPOOL_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Serve Prometheus metrics (plain HTTP, GET /metrics) on this address
    /// (default: off; no TLS or authentication, so keep it on loopback or a
    /// monitoring network; port 0 = any free port).
    #[arg(long, env = "EDGEPOOL_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Start a new process session (used by `cloud-manager dev --replicas`,
    /// so that each replica is a process session of its own).
    #[arg(long, hide = true)]
    pub new_session: bool,
    /// Exit when the parent process goes away (used by `cloud-manager dev
    /// --replicas`).
    #[arg(long, hide = true)]
    pub exit_with_parent: bool,
}

impl ServeArgs {
    /// The config file (or defaults) with flags and env applied, validated.
    pub fn resolve(&self) -> anyhow::Result<ManagerConfig> {
        let mut c = match &self.config {
            Some(p) => ManagerConfig::from_file(p)?,
            None => ManagerConfig::default(),
        };
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = &self.trust_domain {
            c.trust_domain = v.clone();
        }
        if !self.server_names.is_empty() {
            c.server_names = self.server_names.clone();
        }
        if let Some(v) = &self.default_tenant {
            c.default_tenant = v.clone();
        }
        for (flag, field) in [
            (
                self.token_default_ttl_seconds,
                &mut c.token_default_ttl_seconds,
            ),
            (self.token_max_ttl_seconds, &mut c.token_max_ttl_seconds),
            (
                self.node_cert_validity_hours,
                &mut c.node_cert_validity_hours,
            ),
            (self.telemetry_interval_ms, &mut c.telemetry_interval_ms),
            (self.heartbeat_interval_ms, &mut c.heartbeat_interval_ms),
            (
                self.member_cert_validity_seconds,
                &mut c.member_cert_validity_seconds,
            ),
            (self.member_cert_check_ms, &mut c.member_cert_check_ms),
            (self.heartbeat_timeout_ms, &mut c.heartbeat_timeout_ms),
            (self.failure_grace_ms, &mut c.failure_grace_ms),
            (self.startup_grace_ms, &mut c.startup_grace_ms),
            (self.failure_check_ms, &mut c.failure_check_ms),
            (self.peer_check_timeout_ms, &mut c.peer_check_timeout_ms),
            (self.ping_timeout_ms, &mut c.ping_timeout_ms),
            (self.peer_recheck_ms, &mut c.peer_recheck_ms),
            (self.events_per_tenant, &mut c.events_per_tenant),
            (
                self.max_concurrent_handshakes,
                &mut c.max_concurrent_handshakes,
            ),
            (self.handshake_timeout_ms, &mut c.handshake_timeout_ms),
            (self.enroll_rate_per_second, &mut c.enroll_rate_per_second),
            (self.enroll_burst, &mut c.enroll_burst),
            (
                self.max_concurrent_stream_opens,
                &mut c.max_concurrent_stream_opens,
            ),
            (self.stream_open_retry_ms, &mut c.stream_open_retry_ms),
            (self.etcd_lease_ttl_seconds, &mut c.etcd_lease_ttl_seconds),
            (self.etcd_max_txn_ops, &mut c.etcd_max_txn_ops),
        ] {
            if let Some(v) = flag {
                *field = v;
            }
        }
        if let Some(v) = self.peer_confirmation {
            c.peer_confirmation = v;
        }
        if let Some(v) = self.store {
            c.store = v;
        }
        if let Some(v) = &self.advertise_address {
            c.advertise_address = Some(v.clone());
        }
        if !self.etcd_endpoints.is_empty() {
            c.etcd_endpoints = self.etcd_endpoints.clone();
        }
        if let Some(v) = &self.etcd_prefix {
            c.etcd_prefix = v.clone();
        }
        for (flag, field) in [
            (&self.etcd_ca_cert, &mut c.etcd_ca_cert),
            (&self.etcd_cert, &mut c.etcd_cert),
            (&self.etcd_key, &mut c.etcd_key),
        ] {
            if flag.is_some() {
                *field = flag.clone();
            }
        }
        if let Some(v) = self.log_format {
            c.log_format = v;
        }
        if let Some(v) = self.http_listen {
            c.http_listen = v;
        }
        if let Some(v) = self.http_tls {
            c.http_tls = v;
        }
        if let Some(v) = self.metrics_listen {
            c.metrics_listen = Some(v);
        }
        c.validate()?;
        Ok(c)
    }
}

/// The manager's data dir, named the same way by every subcommand that
/// uses it (`serve` has its own, since a config file can set it too).
#[derive(Debug, Args)]
pub struct DataDirArg {
    /// The manager's data dir: the CA (ca.pem, ca.key), the server
    /// certificate, the first tenant bundle and the state.
    #[arg(
        long = "data-dir",
        visible_alias = "dir",
        env = "EDGEPOOL_DATA_DIR",
        default_value = "./edgepool-data"
    )]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub data: DataDirArg,
    /// SPIFFE trust domain.
    #[arg(long, default_value = "edgepool.local")]
    pub trust_domain: String,
    /// Host name or IP the agents and tenants dial, for the server
    /// certificate (repeat or comma-separate). localhost, 127.0.0.1, ::1 and
    /// this host's name are always included.
    #[arg(long = "server-name", value_delimiter = ',')]
    pub server_names: Vec<String>,
    /// Tenant of the first client bundle.
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Lifetime of the first tenant client certificate, in days (1 to
    /// 3650). Issue a new one with `tenant-bundle` before it ends.
    #[arg(long, default_value_t = crate::ca::DEFAULT_TENANT_CERT_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub validity_days: u32,
    /// Replace an existing CA. Every certificate issued by the old one stops
    /// working: agents must join again.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct TenantBundleArgs {
    #[command(flatten)]
    pub data: DataDirArg,
    /// Trust domain of the CA.
    #[arg(long, default_value = "edgepool.local")]
    pub trust_domain: String,
    /// Tenant the bundle acts for.
    #[arg(long)]
    pub tenant: String,
    /// User name inside the tenant.
    #[arg(long, default_value = "admin")]
    pub user: String,
    /// Where to write <tenant>.pem and <tenant>.key.
    #[arg(long, default_value = ".")]
    pub out_dir: PathBuf,
    /// Lifetime of the certificate, in days (1 to 3650). A leaked one is
    /// stopped by `cloud-manager tenant revoke`.
    #[arg(long, default_value_t = crate::ca::DEFAULT_TENANT_CERT_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub validity_days: u32,
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Revoke a tenant client certificate: the manager on this data dir
    /// refuses it from its next TLS handshake on (no restart). Adds its
    /// serial to DIR/revoked-certs.
    Revoke(TenantRevokeArgs),
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Revoke a node identity certificate (a lost or compromised edge
    /// machine): the manager on this data dir refuses it from its next TLS
    /// handshake on, ends the node's open stream within a second, and, if
    /// the node is a pool member, moves its slot to a spare without
    /// waiting for its peers' word. Adds its serial to DIR/revoked-certs.
    /// The machine comes back only with a new `edge-agent join`.
    Revoke(TenantRevokeArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["cert", "serial"])))]
pub struct TenantRevokeArgs {
    #[command(flatten)]
    pub data: DataDirArg,
    /// The certificate to revoke (PEM, e.g. ./acme.pem, or a node's
    /// DATA_DIR/node.pem for `node revoke`).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Or its serial number, in hex (as `openssl x509 -serial` prints it).
    #[arg(long)]
    pub serial: Option<String>,
}

#[derive(Debug, Args)]
pub struct FingerprintArgs {
    #[command(flatten)]
    pub data: DataDirArg,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Directory for the CA, the state and the agents' data.
    #[arg(
        long = "data-dir",
        visible_alias = "dir",
        default_value = "./edgepool-dev"
    )]
    pub dir: PathBuf,
    /// Number of local agents (dev-1 .. dev-K), 1 to 250.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=250))]
    pub agents: u8,
    /// Manager listen address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// Web dashboard address (loopback). When it is taken, a free port on
    /// 127.0.0.1 is used instead; the banner and DIR/dashboard.url say which.
    #[arg(long, default_value = "127.0.0.1:7480", value_name = "ADDR")]
    pub http_listen: SocketAddr,
    /// Peer port of the agents (agent N listens on 127.0.1.N:PORT; 0 = any free port).
    #[arg(long, default_value_t = 7444)]
    pub peer_port: u16,
    /// Do not create the `demo` pool (dev-1..dev-3 with sample apps, dev-4
    /// left free as the spare; needs --agents 4 or more).
    #[arg(long)]
    pub no_demo: bool,
    /// Do not start a fleet: ask the `dev` already running on this data dir
    /// to start agent NODE (e.g. dev-2) again after it crashed or was
    /// killed. The agent runs under that `dev` (its log is appended to, and
    /// Ctrl-C there stops it).
    #[arg(long, value_name = "NODE")]
    pub restart_agent: Option<String>,
    /// Run R manager replicas (1 to 9) instead of the in-process manager:
    /// each a `cloud-manager serve --store etcd` process of its own, on the
    /// etcd at --etcd (which you start). One leads, the others wait as
    /// standbys and take over when it dies; the agents are given every
    /// replica's address. Replica N keeps its data in DIR/managers/m-N/
    /// (manager.pid, addr, manager.log) and listens on the --listen port
    /// plus N-1 (any free port with port 0).
    #[arg(long, value_name = "R", requires = "etcd",
          value_parser = clap::value_parser!(u8).range(1..=9))]
    pub replicas: Option<u8>,
    /// etcd endpoint(s) of the replicas (http://HOST:2379; comma-separate
    /// several), with --replicas. Each dev data dir gets its own key prefix
    /// there (/edgepool-dev/ and the start of its CA's fingerprint).
    #[arg(long, value_name = "URL", requires = "replicas")]
    pub etcd: Option<String>,
}
