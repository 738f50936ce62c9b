//! Command-line behaviour: help, bad config, init safety.

use std::process::Command;

use edgepool_tests::*;

#[test]
fn help_explains_every_command() {
    let out = run(Command::new(bin("cloud-manager")).arg("--help"));
    assert!(out.ok);
    for cmd in ["serve", "init", "dev", "tenant-bundle", "agent"] {
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
