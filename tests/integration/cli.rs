//! Command-line behaviour: help, bad config, init safety.

use std::process::Command;

use edgepool_tests::*;

#[test]
fn help_explains_every_command() {
    let out = run(Command::new(bin("cloud-manager")).arg("--help"));
    assert!(out.ok);
    for cmd in [
        "serve",
        "init",
        "dev",
        "tenant-bundle",
        "fingerprint",
        "agent",
    ] {
        assert!(out.stdout.contains(cmd), "{cmd} missing:\n{}", out.stdout);
    }
    let out = run(Command::new(bin("edge-agent")).arg("--help"));
    assert!(out.ok && out.stdout.contains("join") && out.stdout.contains("run"));
    let out = run(Command::new(bin("edge-agent")).args(["join", "--help"]));
    assert!(out.stdout.contains("--ca-fingerprint") && out.stdout.contains("--force"));
}

#[test]
fn bad_config_exits_before_binding_and_names_the_field() {
    let tmp = TempDir::new().unwrap();
    let cfg = tmp.path().join("m.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\ntelemetry_intervall_ms = 5\n",
    )
    .unwrap();
    let out = run(Command::new(bin("cloud-manager"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(tmp.path().join("data")));
    assert!(!out.ok);
    assert!(
        out.stderr.contains("telemetry_intervall_ms"),
        "{}",
        out.stderr
    );
    assert!(
        !tmp.path().join("data").exists(),
        "created state despite bad config"
    );

    std::fs::write(&cfg, "telemetry_interval_ms = 5\n").unwrap();
    let out = run(Command::new(bin("cloud-manager"))
        .args(["serve", "--config"])
        .arg(&cfg));
    assert!(
        !out.ok && out.stderr.contains("telemetry_interval_ms"),
        "{}",
        out.stderr
    );

    let acfg = tmp.path().join("a.toml");
    std::fs::write(&acfg, "[capacity]\ncpus = 4\n").unwrap();
    let out = run(Command::new(bin("edge-agent"))
        .args(["run", "--config"])
        .arg(&acfg));
    assert!(!out.ok && out.stderr.contains("cpus"), "{}", out.stderr);

    let out = run(Command::new(bin("edge-agent"))
        .args(["run", "--data-dir"])
        .arg(tmp.path().join("nothing-here"))
        .args(["--peer-listen", "127.0.0.1:0"]));
    assert!(
        !out.ok && out.stderr.contains("edge-agent join"),
        "{}",
        out.stderr
    );
}

#[test]
fn init_refuses_to_overwrite_a_ca() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("ca");
    let first = run(Command::new(bin("cloud-manager"))
        .args(["init", "--dir"])
        .arg(&dir));
    assert!(first.ok, "{}", first.stderr);
    assert!(first.stdout.contains("sha256:"));
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    let again = run(Command::new(bin("cloud-manager"))
        .args(["init", "--dir"])
        .arg(&dir));
    assert!(
        !again.ok && again.stderr.contains("--force"),
        "{}",
        again.stderr
    );
    assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), ca);
    let forced = run(Command::new(bin("cloud-manager"))
        .args(["init", "--force", "--dir"])
        .arg(&dir));
    assert!(forced.ok);
    assert_ne!(std::fs::read(dir.join("ca.pem")).unwrap(), ca);
}

/// One flag name per meaning: `--data-dir` on every subcommand that takes
/// the manager's data dir (`--dir` still works), and `--help` says so.
#[test]
fn every_subcommand_takes_data_dir() {
    for sub in ["serve", "init", "dev", "tenant-bundle", "fingerprint"] {
        let out = run(Command::new(bin("cloud-manager")).args([sub, "--help"]));
        assert!(out.ok, "{sub} --help: {}", out.stderr);
        assert!(out.stdout.contains("--data-dir"), "{sub}:\n{}", out.stdout);
    }
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("m");
    let init = run(Command::new(bin("cloud-manager"))
        .args(["init", "--data-dir"])
        .arg(&dir));
    assert!(init.ok, "{}", init.stderr);
    let printed = init
        .stdout
        .lines()
        .find_map(|l| l.split("--ca-fingerprint): ").nth(1))
        .expect("init prints the fingerprint")
        .trim()
        .to_string();
    // The fingerprint can be printed again, under either spelling.
    for flag in ["--data-dir", "--dir"] {
        let out = run(Command::new(bin("cloud-manager"))
            .args(["fingerprint", flag])
            .arg(&dir));
        assert!(out.ok, "{}", out.stderr);
        assert_eq!(out.stdout.trim(), printed);
    }
    let out = run(Command::new(bin("cloud-manager"))
        .args(["fingerprint", "--data-dir"])
        .arg(tmp.path().join("nothing")));
    assert!(
        !out.ok && out.stderr.contains("init --data-dir"),
        "{}",
        out.stderr
    );
    let out = run(Command::new(bin("cloud-manager"))
        .args(["tenant-bundle", "--tenant", "acme", "--data-dir"])
        .arg(&dir)
        .arg("--out-dir")
        .arg(tmp.path()));
    assert!(
        out.ok && tmp.path().join("acme.pem").exists(),
        "{}",
        out.stderr
    );
}

/// `init --server-name public.example` still makes a certificate that
/// loopback dials accept: localhost, 127.0.0.1 and the host name are
/// always in it.
#[tokio::test]
async fn init_with_a_public_name_still_serves_loopback() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("m");
    let init = run(Command::new(bin("cloud-manager"))
        .args([
            "init",
            "--server-name",
            "manager.example.com",
            "--server-name",
            "10.1.2.3",
            "--data-dir",
        ])
        .arg(&dir));
    assert!(init.ok, "{}", init.stderr);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    for name in [
        "manager.example.com",
        "10.1.2.3",
        "localhost",
        "127.0.0.1",
        host.trim(),
    ] {
        assert!(
            init.stdout.contains(name),
            "{name} missing:\n{}",
            init.stdout
        );
    }
    let m = Manager::start(&dir).await;
    // The support library dials 127.0.0.1 and checks the server name.
    let nodes = list_nodes(&mut m.tenant()).await;
    assert!(nodes.is_empty());
}

/// A data dir in use and a taken port are refused with a message that
/// says so, and a refused start writes nothing.
#[tokio::test]
async fn a_second_manager_is_refused_before_writing_anything() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("m");
    let m = Manager::start(&dir).await;
    let out = run(Command::new(bin("cloud-manager"))
        .args([
            "serve",
            "--http-listen",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&dir));
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains(&format!("another cloud-manager is using {}", dir.display())),
        "{}",
        out.stderr
    );
    let fresh = tmp.path().join("fresh");
    for sub in ["serve", "dev"] {
        let out = run(Command::new(bin("cloud-manager"))
            .args([sub, "--listen", &m.addr.to_string(), "--data-dir"])
            .arg(&fresh));
        assert!(!out.ok);
        assert!(
            out.stderr.contains(&format!("cannot listen on {}", m.addr)),
            "{sub}: {}",
            out.stderr
        );
        assert!(
            !fresh.exists(),
            "{sub} wrote {} before failing",
            fresh.display()
        );
    }
}
