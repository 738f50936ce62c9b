//! `edgectl`: the tenant CLI. kubectl/nomad-like verbs over
//! `edge.v1.TenantService`, with the tenant's mTLS client certificate.
//!
//! Table output by default, `-o json` for scripts. Settings come from flags,
//! `EDGECTL_*` environment variables or a config file (see `config`).
#![forbid(unsafe_code)]

#[path = "edgectl/config.rs"]
mod config;
#[path = "edgectl/poolfile.rs"]
mod poolfile;
#[path = "edgectl/render.rs"]
mod render;
#[path = "edgectl/top.rs"]
mod top;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use edgepool_common::proto as pb;
use edgepool_common::tls;
use pb::tenant_service_client::TenantServiceClient;
use tonic::transport::Channel;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of each unary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Without `--follow`, how long `events` listens after the stream opens.
const EVENTS_WINDOW: Duration = Duration::from_millis(300);

const CONFIG_HELP: &str = "\
Settings (first wins): flag, environment variable, config file, default.
The config file is --config/EDGECTL_CONFIG, else ./edgepool-dev/edgectl.toml
(written by `cloud-manager dev`), else ~/.config/edgectl/config.toml:

  manager = \"127.0.0.1:7443\"
  ca_cert = \"ca.pem\"        # relative paths are relative to the config file
  cert = \"tenant.pem\"
  key = \"tenant.key\"

Exit codes: 0 ok, 1 error (gRPC errors print as `edgectl: <code>: <message>`),
2 bad usage.";

#[derive(Parser, Debug)]
#[command(
    name = "edgectl",
    version = edgepool_common::VERSION,
    about = "Tenant CLI for edgepool: nodes, join tokens, pools and events",
    after_help = CONFIG_HELP
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Debug)]
struct Global {
    /// Manager gRPC address, or several (replicas) comma-separated, tried in
    /// turn [default: from the config file, else 127.0.0.1:7443]
    #[arg(
        long,
        env = "EDGECTL_MANAGER",
        value_name = "HOST:PORT",
        global = true,
        help_heading = "Global options"
    )]
    manager: Option<String>,
    /// CA certificate the manager's certificate must chain to (ca.pem)
    #[arg(
        long,
        env = "EDGECTL_CA_CERT",
        value_name = "FILE",
        global = true,
        help_heading = "Global options"
    )]
    ca_cert: Option<PathBuf>,
    /// Tenant client certificate (tenant.pem)
    #[arg(
        long,
        env = "EDGECTL_CERT",
        value_name = "FILE",
        global = true,
        help_heading = "Global options"
    )]
    cert: Option<PathBuf>,
    /// Tenant private key (tenant.key)
    #[arg(
        long,
        env = "EDGECTL_KEY",
        value_name = "FILE",
        global = true,
        help_heading = "Global options"
    )]
    key: Option<PathBuf>,
    /// Config file [default: ./edgepool-dev/edgectl.toml, else ~/.config/edgectl/config.toml]
    #[arg(
        long,
        env = "EDGECTL_CONFIG",
        value_name = "FILE",
        global = true,
        help_heading = "Global options"
    )]
    config: Option<PathBuf>,
    /// Output format
    #[arg(
        short = 'o',
        long = "output",
        value_enum,
        default_value_t = Output::Table,
        global = true,
        help_heading = "Global options"
    )]
    output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Aligned columns for people
    Table,
    /// JSON (camelCase fields, enum names, RFC 3339 times); one object per line for events
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Enrolled edge nodes: list them, count them by state, or show one
    Node {
        #[command(subcommand)]
        command: NodeCmd,
    },
    /// Join tokens that enroll new edge nodes
    Token {
        #[command(subcommand)]
        command: TokenCmd,
    },
    /// Pools: M member nodes running N apps, with failover and offloading
    Pool {
        #[command(subcommand)]
        command: PoolCmd,
    },
    /// A pool's resource-threshold policy
    Policy {
        #[command(subcommand)]
        command: PolicyCmd,
    },
    /// Show or follow the tenant's events (WatchEvents)
    #[command(long_about = "\
Show or follow the tenant's events (WatchEvents).

Without -f, prints the events that arrive within 300 ms of opening the
stream and exits: the replayed retained events (the manager keeps the newest
1000 of each tenant), then any new ones. With -f, keeps printing new events
until Ctrl-C.

--after 0 (the default) follows the manager's definition: replay nothing,
only new events. Pass --from-start to replay everything retained, or
--after SEQ to replay the retained events after SEQ (e.g. to resume a watch
with the last SEQ you saw). SEQ numbers are shared by all tenants, so yours
skip numbers: that is not a loss. If events after SEQ are no longer kept,
edgectl says so (DataLoss, naming the oldest kept SEQ) and exits with 1.

  edgectl events --from-start            recent history, then exit
  edgectl events --pool web -f           new events of pool web until Ctrl-C
  edgectl events --after 41 -f -o json   resume after event 41, as JSON lines")]
    Events(EventsArgs),
    /// Nodes and apps ordered by usage, redrawn every few seconds (like top)
    #[command(long_about = "\
Nodes and apps ordered by usage (busiest CPU first, then memory), redrawn
every --interval seconds until Ctrl-C. Nodes from ListNodes (every page),
apps from ListPools (where each runs now and what it uses).

  edgectl top                  refresh every 2 s
  edgectl top --once           one frame and exit (for scripts)
  edgectl top --once -o json   {\"nodes\": [...], \"apps\": [...]}, busiest first")]
    Top(TopArgs),
    /// Print a login link to the manager's web dashboard (CreateDashboardLogin)
    #[command(long_about = "\
Print a login link to the manager's web dashboard (CreateDashboardLogin).
Open it in a browser within --ttl seconds: it logs that browser in to this
tenant's view (nodes, pools, live events) for 12 hours. The link is a
secret until it expires; it works once or many times within its lifetime.")]
    Dashboard {
        /// How long the link may be opened, in seconds (0 = 120; at most 3600)
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        ttl: u32,
    },
}

#[derive(Args, Debug)]
struct TopArgs {
    /// Print one frame and exit
    #[arg(long)]
    once: bool,
    /// Seconds between frames
    #[arg(long, value_name = "SECONDS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
    interval: u64,
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Replace pool NAME's policy with the [policy] table of a pool file
    /// (UpdatePolicy; the version goes up by one and every member gets it).
    ///
    /// The table replaces the whole policy: what it leaves out takes the
    /// default (see `edgectl pool create --help`), not the old value.
    Set {
        /// The pool.
        name: String,
        /// Pool file with a [policy] table (see `edgectl pool create --help`).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// List nodes: state, pool slot, connection, usage/capacity, last contact
    #[command(
        visible_alias = "list",
        long_about = "\
List nodes: state, pool slot, connection, usage/capacity, last contact.

Nodes come ordered by id, fetched a page at a time (ListNodes, following
next_page_token until the last page), so a fleet of any size is listed
whole. --state and --pool are applied by the manager.

  edgectl node ls --state suspect        members whose stream is closed
  edgectl node ls --pool web -o json     the members of pool web, as JSON
  edgectl node summary                   only the counts, for a large fleet"
    )]
    Ls(NodeLsArgs),
    /// Count nodes by state (NodeSummary): total, connected, free, member, ...
    #[command(long_about = "\
Count nodes by state (NodeSummary): total, connected, FREE, MEMBER, SUSPECT,
FAILED, FENCED. Cheap at any fleet size: the manager sends only the counts.

  edgectl node summary                   the whole tenant
  edgectl node summary --pool web        the members of pool web")]
    Summary {
        /// Only the members of this pool
        #[arg(long, value_name = "NAME")]
        pool: Option<String>,
    },
    /// Show one node in detail (labels, disks, interfaces, peer reachability)
    Get {
        /// Node id
        id: String,
    },
}

#[derive(Args, Debug)]
struct NodeLsArgs {
    /// Only nodes in this state (any case: member or MEMBER)
    #[arg(long, value_enum, ignore_case = true, value_name = "STATE")]
    state: Option<StateArg>,
    /// Only the members of this pool
    #[arg(long, value_name = "NAME")]
    pool: Option<String>,
    /// Nodes per ListNodes call: 0 = the manager's default (100), at most
    /// 1000; every page is fetched either way
    #[arg(long, value_name = "N", default_value_t = 0)]
    page_size: u32,
}

/// A node state, as `--state` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum StateArg {
    /// Not in a pool: a spare
    Free,
    /// Holds a slot of a pool
    Member,
    /// A member whose stream is closed
    Suspect,
    /// Declared failed; its slot moved to a spare
    Failed,
    /// Came back after its slot moved away
    Fenced,
}

impl From<StateArg> for pb::NodeState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Free => pb::NodeState::Free,
            StateArg::Member => pb::NodeState::Member,
            StateArg::Suspect => pb::NodeState::Suspect,
            StateArg::Failed => pb::NodeState::Failed,
            StateArg::Fenced => pb::NodeState::Fenced,
        }
    }
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Create a single-use join token; prints it and its expiry
    #[command(long_about = "\
Create a single-use join token; prints the token and its expiry.

Use it on the edge machine:
  edge-agent join --manager HOST:PORT --token TOKEN --ca-cert ca.pem --node-id ID")]
    Create {
        /// Lifetime in seconds; 0 = the manager's default (1 hour); at most 7 days
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        ttl: u32,
        /// Label the enrolled node starts with (repeatable)
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
}

#[derive(Subcommand, Debug)]
enum PoolCmd {
    /// Create a pool from a pool file (-f pool.toml)
    #[command(after_long_help = poolfile::FORMAT_HELP)]
    Create {
        /// Pool file (TOML); run `edgectl pool create --help` for the format
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Show a pool: members, placements and policy
    Get {
        /// Pool name
        name: String,
    },
    /// List pools
    #[command(visible_alias = "list")]
    Ls,
    /// Delete a pool: stops its apps and frees its nodes
    #[command(visible_alias = "delete")]
    Rm {
        /// Pool name
        name: String,
    },
    /// Replace a pool's apps with the [[apps]] of a pool file (UpdateApps)
    #[command(
        long_about = "\
Replace a pool's apps with the [[apps]] of a pool file (UpdateApps): adds,
removes and changes apps, restarting only what changed. `name` and `nodes`
may be left out of the file; if `name` is given it must match NAME. The
[policy] table is ignored here.",
        after_long_help = poolfile::FORMAT_HELP
    )]
    Apps {
        /// Pool name
        name: String,
        /// Pool file (TOML) whose [[apps]] become the pool's apps
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Args, Debug)]
struct EventsArgs {
    /// Only this pool's events
    #[arg(long, value_name = "NAME")]
    pool: Option<String>,
    /// Keep streaming new events until Ctrl-C
    #[arg(short = 'f', long)]
    follow: bool,
    /// Replay retained events with a sequence number above SEQ first (0 = only new ones);
    /// fails with DataLoss if some of them are no longer kept
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    after: u64,
    /// Replay every retained event first (the manager keeps the newest 1000 per tenant)
    #[arg(long, conflicts_with = "after")]
    from_start: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

// The edgectl binary's entry point. The same code is built into
// `cloud-manager` (as `cloud-manager edgectl ...`, which `dev`'s
// `DIR/bin/edgectl` runs), where only `main_from` is used.
#[allow(dead_code)]
fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs edgectl with these arguments (the first is the program's name).
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edgectl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => {
                    eprintln!("edgectl: {}", status_line(status));
                    if let Some(hint) = data_loss_hint(status) {
                        eprintln!("edgectl: {hint}");
                    }
                }
                None => eprintln!("edgectl: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// `<code>: <message>` (the transport cause if there is no message).
fn status_line(s: &tonic::Status) -> String {
    let mut msg = s.message().to_string();
    if msg.is_empty() {
        let mut source = std::error::Error::source(s);
        while let Some(e) = source {
            msg = e.to_string();
            source = e.source();
        }
    }
    format!("{:?}: {msg}", s.code())
}

/// What to do after `events` ended with DATA_LOSS: the manager's message
/// names the `after_seq` that resumes from its oldest kept event.
fn data_loss_hint(s: &tonic::Status) -> Option<String> {
    if s.code() != tonic::Code::DataLoss {
        return None;
    }
    let resume = s
        .message()
        .split("after_seq=")
        .nth(1)
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .filter(|n| !n.is_empty());
    Some(match resume {
        Some(n) => format!(
            "some events were dropped before they could be shown; \
             `edgectl events --after {n}` continues from the oldest kept one, \
             --from-start shows all that are kept"
        ),
        None => "some events were dropped before they could be shown; \
                 --from-start shows all that are kept"
            .to_string(),
    })
}

/// Names the manager address in connection failures.
fn with_address(e: anyhow::Error, manager: &str) -> anyhow::Error {
    match e.downcast_ref::<tonic::Status>() {
        Some(s) if s.code() == tonic::Code::Unavailable => {
            let line = status_line(s);
            let msg = line.split_once(": ").map_or("", |(_, m)| m);
            tonic::Status::unavailable(format!(
                "{msg} (manager {manager}; is it running? --manager / EDGECTL_MANAGER)"
            ))
            .into()
        }
        _ => e,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let g = &cli.global;
    // Read the pool file first, so its errors come before any about
    // settings or the connection.
    let pool_file = match &cli.command {
        Cmd::Pool {
            command: PoolCmd::Create { file } | PoolCmd::Apps { file, .. },
        }
        | Cmd::Policy {
            command: PolicyCmd::Set { file, .. },
        } => Some((poolfile::load(file)?, file.clone())),
        _ => None,
    };
    let settings = config::resolve(&config::Overrides {
        config: g.config.clone(),
        manager: g.manager.clone(),
        ca_cert: g.ca_cert.clone(),
        cert: g.cert.clone(),
        key: g.key.clone(),
    })?;
    let mut client = connect(&settings)?;
    dispatch(&mut client, cli.command, pool_file, g.output)
        .await
        .map_err(|e| with_address(e, &settings.manager))
}

async fn dispatch(
    client: &mut TenantServiceClient<Channel>,
    command: Cmd,
    pool_file: Option<(poolfile::PoolFile, PathBuf)>,
    out: Output,
) -> anyhow::Result<()> {
    match command {
        Cmd::Node { command } => match command {
            NodeCmd::Ls(args) => {
                let nodes = all_nodes(client, args).await?;
                match out {
                    Output::Table => emit(&render::nodes_table(&nodes)),
                    Output::Json => emit_json(&serde_json::json!({
                        "nodes": nodes.iter().map(render::node).collect::<Vec<_>>()
                    })),
                }
            }
            NodeCmd::Summary { pool } => {
                let s = client
                    .node_summary(call(pb::NodeSummaryRequest {
                        pool: pool.unwrap_or_default(),
                    }))
                    .await?
                    .into_inner();
                match out {
                    Output::Table => emit(&render::summary_table(&s)),
                    Output::Json => emit_json(&render::summary(&s)),
                }
            }
            NodeCmd::Get { id } => {
                let n = client
                    .get_node(call(pb::GetNodeRequest { node_id: id }))
                    .await?
                    .into_inner();
                match out {
                    Output::Table => emit(&render::node_detail(&n)),
                    Output::Json => emit_json(&render::node(&n)),
                }
            }
        },
        Cmd::Token {
            command: TokenCmd::Create { ttl, labels },
        } => {
            let r = client
                .create_join_token(call(pb::CreateJoinTokenRequest {
                    ttl_seconds: ttl,
                    labels: labels.into_iter().collect(),
                }))
                .await?
                .into_inner();
            match out {
                Output::Table => emit(&format!(
                    "{}\nexpires {}\n",
                    r.token,
                    render::time_s(r.expires_at.as_ref())
                )),
                Output::Json => emit_json(&render::token(&r)),
            }
        }
        Cmd::Pool { command } => pool(client, command, pool_file, out).await,
        Cmd::Policy {
            command: PolicyCmd::Set { name, .. },
        } => {
            let (f, path) = pool_file.context("internal: pool file not loaded")?;
            let policy = f
                .policy
                .as_ref()
                .with_context(|| format!("pool file {} has no [policy] table", path.display()))?;
            let req = pb::UpdatePolicyRequest {
                pool: name,
                policy: Some(policy.to_proto()),
            };
            let p = client.update_policy(call(req)).await?.into_inner();
            match out {
                Output::Table => emit(&render::pool_detail(&p)),
                Output::Json => emit_json(&render::pool(&p)),
            }
        }
        Cmd::Events(args) => events(client, args, out).await,
        Cmd::Top(args) => top(client, args, out).await,
        Cmd::Dashboard { ttl } => {
            let r = client
                .create_dashboard_login(call(pb::CreateDashboardLoginRequest { ttl_seconds: ttl }))
                .await?
                .into_inner();
            match out {
                Output::Table => {
                    emit(&format!("{}\n", r.url))?;
                    eprintln!(
                        "edgectl: open it in a browser before {} (it logs in for 12 hours)",
                        render::time_s(r.expires_at.as_ref())
                    );
                    Ok(())
                }
                Output::Json => emit_json(&serde_json::json!({
                    "url": r.url,
                    "expiresAt": render::ts(r.expires_at.as_ref()),
                })),
            }
        }
    }
}

/// `edgectl top`: a frame every interval until Ctrl-C (or one with --once).
async fn top(
    client: &mut TenantServiceClient<Channel>,
    args: TopArgs,
    out: Output,
) -> anyhow::Result<()> {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let nodes = all_nodes(
            client,
            NodeLsArgs {
                state: None,
                pool: None,
                page_size: 0,
            },
        )
        .await?;
        let pools = client
            .list_pools(call(pb::ListPoolsRequest {}))
            .await?
            .into_inner()
            .pools;
        let frame = top::Frame::new(nodes, pools);
        match (out, args.once) {
            (Output::Json, _) => emit(&format!("{}\n", frame.json()))?,
            (Output::Table, true) => emit(&frame.table())?,
            // Home, clear the screen, then the frame.
            (Output::Table, false) => emit(&format!("\x1b[H\x1b[2J{}", frame.table()))?,
        }
        if args.once {
            return Ok(());
        }
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(args.interval)) => {}
        }
    }
}

/// Every node `args` asks for: ListNodes page after page until the page
/// without a next_page_token. Ordered by node id, as the manager sends them.
async fn all_nodes(
    client: &mut TenantServiceClient<Channel>,
    args: NodeLsArgs,
) -> anyhow::Result<Vec<pb::Node>> {
    let mut req = pb::ListNodesRequest {
        page_size: i32::try_from(args.page_size).unwrap_or(i32::MAX),
        page_token: String::new(),
        state: args.state.map_or(pb::NodeState::Unspecified, Into::into) as i32,
        pool: args.pool.unwrap_or_default(),
    };
    let mut nodes = Vec::new();
    loop {
        let page = client.list_nodes(call(req.clone())).await?.into_inner();
        nodes.extend(page.nodes);
        if page.next_page_token.is_empty() {
            return Ok(nodes);
        }
        // A token that does not move on would loop forever.
        anyhow::ensure!(
            page.next_page_token != req.page_token,
            "the manager sent the same page token twice"
        );
        req.page_token = page.next_page_token;
    }
}

async fn pool(
    client: &mut TenantServiceClient<Channel>,
    command: PoolCmd,
    file: Option<(poolfile::PoolFile, PathBuf)>,
    out: Output,
) -> anyhow::Result<()> {
    let show = |p: &pb::Pool| match out {
        Output::Table => emit(&render::pool_detail(p)),
        Output::Json => emit_json(&render::pool(p)),
    };
    match command {
        PoolCmd::Create { .. } => {
            let (f, path) = file.context("internal: pool file not loaded")?;
            let req = f.create_request(&path)?;
            let p = client.create_pool(call(req)).await?.into_inner();
            show(&p)
        }
        PoolCmd::Apps { name, .. } => {
            let (f, path) = file.context("internal: pool file not loaded")?;
            if let Some(file_name) = f.name.as_deref().filter(|n| *n != name) {
                anyhow::bail!(
                    "pool file {} is for pool {file_name:?}, not {name:?}",
                    path.display()
                );
            }
            if f.apps.is_empty() {
                anyhow::bail!(
                    "pool file {} has no [[apps]]; refusing to remove every app of {name:?} \
                     (use `edgectl pool rm {name}` to delete the pool)",
                    path.display()
                );
            }
            let req = pb::UpdateAppsRequest {
                pool: name,
                apps: f.app_specs(),
            };
            let p = client.update_apps(call(req)).await?.into_inner();
            show(&p)
        }
        PoolCmd::Get { name } => {
            let p = client
                .get_pool(call(pb::GetPoolRequest { name }))
                .await?
                .into_inner();
            show(&p)
        }
        PoolCmd::Ls => {
            let mut pools = client
                .list_pools(call(pb::ListPoolsRequest {}))
                .await?
                .into_inner()
                .pools;
            pools.sort_by(|a, b| a.name.cmp(&b.name));
            match out {
                Output::Table => emit(&render::pools_table(&pools)),
                Output::Json => emit_json(&serde_json::json!({
                    "pools": pools.iter().map(render::pool).collect::<Vec<_>>()
                })),
            }
        }
        PoolCmd::Rm { name } => {
            client
                .delete_pool(call(pb::DeletePoolRequest { name: name.clone() }))
                .await?;
            match out {
                Output::Table => emit(&format!("pool {name} deleted\n")),
                Output::Json => emit_json(&serde_json::json!({})),
            }
        }
    }
}

async fn events(
    client: &mut TenantServiceClient<Channel>,
    args: EventsArgs,
    out: Output,
) -> anyhow::Result<()> {
    let req = pb::WatchEventsRequest {
        pool: args.pool.unwrap_or_default(),
        after_seq: args.after,
        from_start: args.from_start,
    };
    let mut stream = client.watch_events(req).await?.into_inner();
    if !args.follow {
        let deadline = tokio::time::Instant::now() + EVENTS_WINDOW;
        let mut got = Vec::new();
        let mut failed = None;
        loop {
            match tokio::time::timeout_at(deadline, stream.message()).await {
                Err(_) => break,
                Ok(Ok(Some(e))) => got.push(e),
                Ok(Ok(None)) => break,
                Ok(Err(status)) => {
                    failed = Some(status);
                    break;
                }
            }
        }
        if let Some(status) = failed {
            // Show what did arrive before the stream ended, then why.
            if !got.is_empty() {
                print_events(&got, out)?;
            }
            return Err(status.into());
        }
        print_events(&got, out)?;
        if got.is_empty() && out == Output::Table && args.after == 0 && !args.from_start {
            eprintln!(
                "edgectl: no new events; --from-start or --after SEQ replays \
                 retained events, -f follows new ones"
            );
        }
        return Ok(());
    }
    let headers = render::EVENT_HEADERS.map(String::from);
    if out == Output::Table {
        emit(&format!(
            "{}\n",
            render::pad_row(&headers, &render::EVENT_WIDTHS)
        ))?;
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            m = stream.message() => match m? {
                Some(e) => {
                    let line = match out {
                        Output::Table => {
                            render::pad_row(&render::event_cells(&e), &render::EVENT_WIDTHS)
                        }
                        Output::Json => render::event(&e).to_string(),
                    };
                    emit(&format!("{line}\n"))?;
                }
                None => anyhow::bail!("the manager closed the event stream"),
            }
        }
    }
}

/// Events as a table, or as JSON lines.
fn print_events(events: &[pb::Event], out: Output) -> anyhow::Result<()> {
    match out {
        Output::Table => emit(&render::events_table(events)),
        Output::Json => {
            let text: String = events
                .iter()
                .map(|e| format!("{}\n", render::event(e)))
                .collect();
            emit(&text)
        }
    }
}

/// A unary request with the call deadline.
fn call<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    r
}

/// A lazy mTLS channel to the manager with the tenant's certificate.
fn connect(s: &config::Resolved) -> anyhow::Result<TenantServiceClient<Channel>> {
    let ca = tls::read_certs(&s.ca_cert).context("loading the CA certificate (--ca-cert)")?;
    let roots = tls::roots(&ca).context("loading the CA certificate (--ca-cert)")?;
    let chain = tls::read_certs(&s.cert).context("loading the tenant certificate (--cert)")?;
    let key = tls::read_key(&s.key).context("loading the tenant key (--key)")?;
    let tls_config = tls::client_config(roots, Some((chain, key)))
        .context("tenant certificate and key do not fit together")?;
    let addrs = tls::manager_addresses(&s.manager)
        .context("bad manager address (--manager / EDGECTL_MANAGER)")?;
    let channel = tls::channel(reachable(&addrs), Arc::new(tls_config), CONNECT_TIMEOUT)
        .context("bad manager address (--manager / EDGECTL_MANAGER)")?;
    Ok(TenantServiceClient::new(channel))
}

/// Of several manager addresses (replicas), the first that accepts a TCP
/// connection within a second; the first one if none does (the call then
/// fails naming it).
fn reachable(addrs: &[String]) -> &str {
    use std::net::ToSocketAddrs;
    if let [only] = addrs {
        return only;
    }
    addrs
        .iter()
        .find(|a| {
            a.to_socket_addrs().is_ok_and(|mut it| {
                it.any(|sa| {
                    std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(1)).is_ok()
                })
            })
        })
        .or(addrs.first())
        .map_or("", String::as_str)
}

/// Writes to stdout; a closed pipe (`edgectl ... | head`) ends quietly.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
    }
}

fn emit_json(v: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v).context("encoding JSON")?;
    emit(&format!("{text}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn labels_parse() {
        assert_eq!(parse_label("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert_eq!(
            parse_label("zone=").unwrap(),
            ("zone".into(), String::new())
        );
        assert!(parse_label("novalue").is_err());
        assert!(parse_label("=x").is_err());
    }

    #[test]
    fn flags_parse_anywhere() {
        let cli = Cli::try_parse_from([
            "edgectl", "events", "--pool", "web", "-f", "--after", "7", "-o", "json",
        ])
        .unwrap();
        assert_eq!(cli.global.output, Output::Json);
        match cli.command {
            Cmd::Events(a) => {
                assert!(a.follow);
                assert_eq!(a.after, 7);
                assert_eq!(a.pool.as_deref(), Some("web"));
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from([
            "edgectl",
            "node",
            "ls",
            "--state",
            "SUSPECT",
            "--pool",
            "web",
            "--page-size",
            "2",
        ])
        .unwrap();
        match cli.command {
            Cmd::Node {
                command: NodeCmd::Ls(a),
            } => {
                assert_eq!(a.state, Some(StateArg::Suspect));
                assert_eq!(a.pool.as_deref(), Some("web"));
                assert_eq!(a.page_size, 2);
            }
            other => panic!("{other:?}"),
        }
        let err = Cli::try_parse_from(["edgectl", "node", "ls", "--state", "up"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = Cli::try_parse_from(["edgectl", "pool", "create"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
