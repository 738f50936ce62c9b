//! The Debian packaging in `packaging/` (built by `scripts/package.sh`):
//! the systemd units pass `systemd-analyze verify` and carry the required
//! hardening, the default configs are accepted by the real daemons, and
//! every file the package metadata ships exists.

use std::path::{Path, PathBuf};
use std::process::Command;

use edgepool_tests::*;

/// The repository root (the tests crate is one level below it).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// One Debian package: its unit and the command line the unit runs.
struct Package {
    name: &'static str,
    unit: &'static str,
    /// Binaries in /usr/bin.
    bins: &'static [&'static str],
    /// Default config, shipped as /etc/edgepool/<config>.
    config: &'static str,
    exec: &'static str,
}

const PACKAGES: [Package; 2] = [
    Package {
        name: "cloud-manager",
        unit: "packaging/cloud-manager/cloud-manager.service",
        bins: &["cloud-manager", "edgectl"],
        config: "manager.toml",
        exec: "/usr/bin/cloud-manager serve --config /etc/edgepool/manager.toml",
    },
    Package {
        name: "edge-agent",
        unit: "packaging/edge-agent/edge-agent.service",
        bins: &["edge-agent"],
        config: "agent.toml",
        exec: "/usr/bin/edge-agent run --config /etc/edgepool/agent.toml",
    },
];

fn systemd_analyze() -> &'static str {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "systemd-analyze not found: install the Debian package `systemd` (scripts/test.sh does)"
    );
    "systemd-analyze"
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let analyze = systemd_analyze();
    let tmp = TempDir::new().unwrap();
    let mut units = Vec::new();
    for p in &PACKAGES {
        let text = std::fs::read_to_string(repo().join(p.unit)).unwrap();
        // verify checks that ExecStart= programs exist: point the unit at
        // the built binary instead of /usr/bin, where the package puts it.
        let program = p.exec.split(' ').next().unwrap();
        let built = bin(program.trim_start_matches("/usr/bin/"));
        assert!(text.contains(program), "{} does not run {program}", p.unit);
        let rewritten = text.replace(program, built.to_str().unwrap());
        let dest = tmp.path().join(Path::new(p.unit).file_name().unwrap());
        std::fs::write(&dest, rewritten).unwrap();
        units.push(dest);
    }
    let out = run(Command::new(analyze).arg("verify").args(&units));
    // verify exits 0 even for unknown keys and bad values (it only warns
    // and ignores them): anything it prints is a failure.
    assert!(
        out.ok && out.stdout.trim().is_empty() && out.stderr.trim().is_empty(),
        "systemd-analyze verify {}:\n{}{}",
        units
            .iter()
            .map(|u| u.display().to_string())
            .collect::<Vec<_>>()
            .join(" "),
        out.stdout,
        out.stderr
    );

    // It does report problems (so an empty output above means something).
    let broken = tmp.path().join("broken.service");
    std::fs::write(
        &broken,
        "[Service]\nExecStart=/bin/true\nProtectSystme=strict\nRestart=sometimes\n",
    )
    .unwrap();
    let out = run(Command::new(analyze).arg("verify").arg(&broken));
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        said.contains("ProtectSystme") && said.contains("sometimes"),
        "systemd-analyze verify did not report a broken unit:\n{said}"
    );
}

/// The `[Service]` settings of a unit file, as (key, value) in file order.
fn settings(unit: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(repo().join(unit))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn systemd_units_are_hardened() {
    for p in &PACKAGES {
        let unit = p.unit;
        let s = settings(unit);
        let get = |key: &str| -> Vec<&str> {
            s.iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        let user = get("User");
        assert_eq!(user.len(), 1, "{unit}: one User=");
        if p.name == "edge-agent" {
            // Root, to run apps as edgepool-app, with only these powers.
            assert_eq!(user[0], "root", "{unit}");
            assert_eq!(
                get("CapabilityBoundingSet"),
                [
                    "CAP_SETUID CAP_SETGID CAP_CHOWN CAP_FOWNER CAP_KILL CAP_DAC_OVERRIDE CAP_SYS_PTRACE"
                ],
                "{unit}"
            );
            assert_eq!(get("Delegate"), ["yes"], "{unit}: app cgroups");
            assert_eq!(get("StateDirectoryMode"), ["0700"], "{unit}: keys");
        } else {
            assert_ne!(user[0], "root", "{unit}: own system user");
            assert_eq!(get("CapabilityBoundingSet"), [""], "{unit}");
        }
        for (key, want) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("PrivateTmp", "yes"),
            ("Restart", "on-failure"),
        ] {
            assert_eq!(get(key), [want], "{unit}: {key}");
        }
        assert!(!get("ProtectHome").is_empty(), "{unit}: ProtectHome");
        assert_eq!(get("ExecStart"), [p.exec], "{unit}");
        // The state directory is the data dir of the shipped config.
        let state = get("StateDirectory");
        assert_eq!(state.len(), 1, "{unit}: StateDirectory");
        let config = p.config;
        let toml =
            std::fs::read_to_string(repo().join("packaging").join(p.name).join(config)).unwrap();
        assert!(
            toml.lines()
                .any(|l| l.trim() == format!("data_dir = \"/var/lib/{}\"", state[0])),
            "{config} must set data_dir = \"/var/lib/{}\"",
            state[0]
        );
        assert_eq!(
            get("WorkingDirectory"),
            [format!("/var/lib/{}", state[0])],
            "{unit}"
        );
    }
    // The agent is skipped, not restarted in a loop, until the node joined:
    // node.json is what `edge-agent join` writes last.
    let agent = settings("packaging/edge-agent/edge-agent.service");
    assert!(
        agent
            .iter()
            .any(|(k, v)| k == "ConditionPathExists" && v == "/var/lib/edge-agent/node.json"),
        "edge-agent.service: ConditionPathExists=/var/lib/edge-agent/node.json"
    );
}

#[tokio::test]
async fn shipped_configs_are_valid_for_the_daemons() {
    let tmp = TempDir::new().unwrap();
    // The manager serves with the shipped file (flags override only the
    // address and directory, as everything in the file is still parsed
    // and validated, unknown fields included).
    let config = repo().join("packaging/cloud-manager/manager.toml");
    let m = Manager::start_on(
        &tmp.path().join("manager"),
        "127.0.0.1:0".parse().unwrap(),
        &["--config", config.to_str().unwrap()],
    )
    .await;
    assert!(m.ca().exists());
    drop(m);

    // The agent accepts its file and stops only because nothing has joined.
    let config = repo().join("packaging/edge-agent/agent.toml");
    let empty = tmp.path().join("not-joined");
    std::fs::create_dir_all(&empty).unwrap();
    let out = run(Command::new(bin("edge-agent"))
        .args(["run", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&empty)
        .args(["--peer-listen", "127.0.0.1:0"]));
    assert!(!out.ok);
    assert!(
        out.stderr.contains("edge-agent join")
            && !out.stderr.contains("config file")
            && !out.stderr.contains("config field"),
        "{}",
        out.stderr
    );
}

#[test]
fn package_metadata_ships_existing_files() {
    for p in &PACKAGES {
        let package = p.name;
        let dir = repo().join(package);
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        let deb = manifest
            .split("[package.metadata.deb]")
            .nth(1)
            .unwrap_or_else(|| panic!("{package}/Cargo.toml has no [package.metadata.deb]"));
        assert!(deb.contains(&format!("name = \"{package}\"")), "{package}");
        let mut sources = Vec::new();
        for line in deb.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("[\"") {
                let source = rest.split('"').next().unwrap();
                let dest = rest.split('"').nth(2).unwrap_or_default();
                sources.push((source.to_string(), dest.to_string()));
            }
        }
        let mut shipped_bins = Vec::new();
        for (source, dest) in &sources {
            if let Some(b) = source.strip_prefix("target/release/") {
                assert_eq!(dest, "usr/bin/", "{package}: {source}");
                shipped_bins.push(b.to_string());
            } else {
                assert!(
                    dir.join(source).is_file(),
                    "{package}: asset {source} does not exist"
                );
            }
        }
        assert_eq!(shipped_bins, p.bins, "{package}: binaries in /usr/bin");
        let config = p.config;
        assert!(
            sources.iter().any(
                |(s, d)| s.ends_with(&format!("packaging/{package}/{config}"))
                    && d == &format!("etc/edgepool/{config}")
            ),
            "{package}: {config} must go to /etc/edgepool (a conffile)"
        );
        for script in ["postinst", "postrm"] {
            let path = repo().join("packaging").join(package).join(script);
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.contains("#DEBHELPER#"), "{script} needs #DEBHELPER#");
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(&path).unwrap().permissions(),
            );
            assert!(mode & 0o111 != 0, "{} is not executable", path.display());
        }
    }
}
