//! What each `cloud-manager` subcommand does.

use anyhow::Context;
use edgepool_common::logging::{self, LogFormat};
use tokio_util::sync::CancellationToken;

use crate::ca::{self, Ca, CaFiles};
use crate::cli::{
    Command, FingerprintArgs, InitArgs, NodeCommand, TenantBundleArgs, TenantCommand,
    TenantRevokeArgs,
};

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            // Bad config exits here, before anything binds.
            let config = args.resolve()?;
            logging::init(config.log_format, "info");
            if args.new_session {
                nix::unistd::setsid().context("starting a new process session")?;
            }
            let parent = nix::unistd::getppid();
            runtime()?.block_on(async move {
                let shutdown = CancellationToken::new();
                edgepool_common::grpc::cancel_on_signals(shutdown.clone())?;
                if args.exit_with_parent {
                    exit_with_parent(parent, shutdown.clone());
                }
                let server = crate::server::build_until(config, shutdown.clone()).await?;
                server.run(shutdown).await
            })
        }
        Command::Init(args) => init(args),
        Command::TenantBundle(args) => tenant_bundle(args),
        Command::Tenant {
            command: TenantCommand::Revoke(args),
        } => revoke(args, Revoked::Tenant),
        Command::Node {
            command: NodeCommand::Revoke(args),
        } => revoke(args, Revoked::Node),
        Command::Fingerprint(args) => fingerprint(args),
        Command::Dev(args) => {
            logging::init(LogFormat::Plain, "warn,cloud_manager::dev=info");
            // With replicas (and not a restart request): separate
            // manager processes on etcd; otherwise one in-process manager.
            match (args.replicas, args.etcd.clone()) {
                (Some(replicas), Some(etcd)) if args.restart_agent.is_none() => {
                    runtime()?.block_on(crate::dev_replicas::run(args, replicas, etcd))
                }
                _ => runtime()?.block_on(crate::dev::run(args)),
            }
        }
        Command::Agent { .. } => anyhow::bail!("handled in main"),
    }
}

/// Shuts down when the parent process goes away (`dev` died): checks every
/// half second, as the agent's `--exit-with-parent` does.
fn exit_with_parent(parent: nix::unistd::Pid, shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            if nix::unistd::getppid() != parent {
                tracing::warn!("parent process is gone: shutting down");
                shutdown.cancel();
                return;
            }
        }
    });
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    edgepool_common::identity::validate_domain(&args.trust_domain)?;
    edgepool_common::identity::validate_name("tenant", &args.tenant)?;
    let report = ca::init(
        &args.data.dir,
        &args.trust_domain,
        &args.server_names,
        &args.tenant,
        time::Duration::days(i64::from(args.validity_days)),
        args.force,
    )?;
    let f = &report.files;
    println!("created in {}:", args.data.dir.display());
    println!(
        "  root CA          {} (key {}, mode 0600)",
        f.ca_cert().display(),
        f.ca_key().display()
    );
    println!(
        "  server cert      {} for {}",
        f.server_cert().display(),
        report.server_names.join(", ")
    );
    println!(
        "  tenant bundle    {} + {} (tenant {:?})",
        f.tenant_cert().display(),
        f.tenant_key().display(),
        args.tenant
    );
    println!(
        "CA fingerprint (for edge-agent join --ca-fingerprint): {}",
        report.fingerprint
    );
    Ok(())
}

fn fingerprint(args: FingerprintArgs) -> anyhow::Result<()> {
    let path = CaFiles::new(&args.data.dir).ca_cert();
    let pem = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (is {} a manager data dir? `cloud-manager init --data-dir DIR` makes one)",
            path.display(),
            args.data.dir.display()
        )
    })?;
    println!("{}", ca::fingerprint_of_pem(&pem)?);
    Ok(())
}

fn tenant_bundle(args: TenantBundleArgs) -> anyhow::Result<()> {
    edgepool_common::identity::validate_name("tenant", &args.tenant)?;
    edgepool_common::identity::validate_name("user", &args.user)?;
    let ca = Ca::load(&CaFiles::new(&args.data.dir), &args.trust_domain)?;
    let bundle = ca.issue_tenant_client(
        &args.tenant,
        &args.user,
        time::Duration::days(i64::from(args.validity_days)),
    )?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let cert = args.out_dir.join(format!("{}.pem", args.tenant));
    let key = args.out_dir.join(format!("{}.key", args.tenant));
    edgepool_common::fsutil::write_private(&key, bundle.key_pem.as_bytes())
        .with_context(|| format!("writing {}", key.display()))?;
    edgepool_common::fsutil::write_public(&cert, bundle.cert_pem.as_bytes())
        .with_context(|| format!("writing {}", cert.display()))?;
    println!(
        "wrote {} and {} (tenant {:?}, user {:?})",
        cert.display(),
        key.display(),
        args.tenant,
        args.user
    );
    Ok(())
}

/// Which kind of certificate a `revoke` command takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Revoked {
    Tenant,
    Node,
}

fn revoke(args: TenantRevokeArgs, kind: Revoked) -> anyhow::Result<()> {
    use edgepool_common::identity::{Identity, cert_serial_hex};
    let dir = &args.data.dir;
    let root_path = CaFiles::new(dir).ca_cert();
    let root_pem = std::fs::read_to_string(&root_path).with_context(|| {
        format!(
            "reading {} (is {} a manager data dir? give it with --data-dir)",
            root_path.display(),
            dir.display()
        )
    })?;
    let (serial, what) = match (&args.cert, &args.serial) {
        (Some(path), _) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let der =
                edgepool_common::tls::certs_from_pem(&pem, &path.display().to_string())?.remove(0);
            let identity = Identity::from_cert_der(der.as_ref())
                .with_context(|| format!("{}: not an edgepool certificate", path.display()))?;
            match (kind, &identity) {
                (Revoked::Tenant, Identity::Tenant { .. })
                | (Revoked::Node, Identity::Node { .. }) => {}
                (Revoked::Tenant, _) => anyhow::bail!(
                    "{}: names {identity}, not a tenant (node certificates: `cloud-manager node revoke`; member certificates are revoked by failover)",
                    path.display()
                ),
                (Revoked::Node, _) => anyhow::bail!(
                    "{}: names {identity}, not a node (tenant certificates: `cloud-manager tenant revoke`; member certificates are revoked by failover)",
                    path.display()
                ),
            }
            // Only a certificate of this data dir's CA is worth listing.
            let root = edgepool_common::tls::certs_from_pem(&root_pem, "ca.pem")?.remove(0);
            let signed_here = edgepool_common::trust::RootIssued::new(&root)?
                .check(&der, rustls::pki_types::UnixTime::now());
            if let Err(e) = signed_here {
                let expired = matches!(
                    e,
                    rustls::Error::InvalidCertificate(rustls::CertificateError::Expired)
                        | rustls::Error::InvalidCertificate(
                            rustls::CertificateError::ExpiredContext { .. }
                        )
                );
                if !expired {
                    anyhow::bail!(
                        "{}: not issued by the CA in {} ({e})",
                        path.display(),
                        dir.display()
                    );
                }
            }
            (cert_serial_hex(der.as_ref())?, identity.to_string())
        }
        (None, Some(serial)) => {
            if !crate::revocations::valid_serial(serial) {
                anyhow::bail!(
                    "--serial {serial:?}: expected 1 to 40 bytes in hex (e.g. 3f:a2:...)"
                );
            }
            (
                crate::revocations::normalize(serial),
                format!("serial {serial}"),
            )
        }
        (None, None) => anyhow::bail!("give --cert FILE or --serial HEX"),
    };
    let added = crate::revocations::revoke(dir, &serial, &what)
        .with_context(|| format!("writing {}", dir.join(crate::revocations::FILE).display()))?;
    if added {
        println!(
            "revoked {what} (serial {serial}); the manager on {} refuses it from its next handshake",
            dir.display()
        );
    } else {
        println!("{what} (serial {serial}) was already revoked");
    }
    Ok(())
}
