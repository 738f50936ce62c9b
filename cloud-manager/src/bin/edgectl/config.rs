//! Where edgectl finds the manager and the tenant credentials.
//!
//! Every setting comes from (first wins) its flag, its environment variable,
//! the config file, or a default (only the manager address has one). The
//! config file is `--config`/`EDGECTL_CONFIG`, else
//! `./edgepool-dev/edgectl.toml` (written by `cloud-manager dev`), else
//! `$HOME/.config/edgectl/config.toml`. Relative paths in a config file are
//! relative to the file's directory; relative paths given as flags or env
//! are relative to the current directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// The manager address when nothing else says otherwise.
pub const DEFAULT_MANAGER: &str = "127.0.0.1:7443";

/// The dev fleet's config, relative to the current directory.
pub const DEV_CONFIG: &str = "edgepool-dev/edgectl.toml";

/// The per-user config, relative to `$HOME`.
pub const USER_CONFIG: &str = ".config/edgectl/config.toml";

/// The config file format.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub manager: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// What the flags and environment gave (clap merges the two).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub manager: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The settings edgectl connects with.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub manager: String,
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The config file that was read, if any.
    pub config: Option<PathBuf>,
}

/// Resolves against the process's current directory and `$HOME`.
pub fn resolve(o: &Overrides) -> anyhow::Result<Resolved> {
    let cwd = std::env::current_dir().context("cannot determine the current directory")?;
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from);
    resolve_in(o, &cwd, home.as_deref())
}

/// The config file to read: the explicit one, else the first that exists.
pub fn find_config(explicit: Option<&Path>, cwd: &Path, home: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    let dev = cwd.join(DEV_CONFIG);
    if dev.is_file() {
        return Some(dev);
    }
    let user = home?.join(USER_CONFIG);
    user.is_file().then_some(user)
}

/// Parses a config file's text.
pub fn parse(text: &str) -> Result<FileConfig, toml::de::Error> {
    toml::from_str(text)
}

pub fn resolve_in(o: &Overrides, cwd: &Path, home: Option<&Path>) -> anyhow::Result<Resolved> {
    let config_path = find_config(o.config.as_deref(), cwd, home);
    let file = match &config_path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config file {}", p.display()))?;
            parse(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let base = config_path
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let from_file = |p: &Option<PathBuf>| p.as_ref().map(|p| base.join(p));

    let missing = |flag: &str, env: &str, key: &str, what: &str| {
        let place = match &config_path {
            Some(p) => format!("set `{key} = \"...\"` in {}", p.display()),
            None => format!(
                "write `{key} = \"...\"` into a config file (--config FILE / EDGECTL_CONFIG; \
                 none found at ./{DEV_CONFIG} or ~/{USER_CONFIG}; `cloud-manager dev` writes one)"
            ),
        };
        anyhow::anyhow!("no {what} configured: pass {flag} FILE, set {env}, or {place}")
    };

    let manager = o
        .manager
        .clone()
        .or(file.manager)
        .unwrap_or_else(|| DEFAULT_MANAGER.to_string());
    if manager.trim().is_empty() {
        bail!("the manager address is empty: pass --manager HOST:PORT or set EDGECTL_MANAGER");
    }
    let ca_cert = o
        .ca_cert
        .clone()
        .or(from_file(&file.ca_cert))
        .ok_or_else(|| {
            missing(
                "--ca-cert",
                "EDGECTL_CA_CERT",
                "ca_cert",
                "CA certificate (the manager's ca.pem)",
            )
        })?;
    let cert = o.cert.clone().or(from_file(&file.cert)).ok_or_else(|| {
        missing(
            "--cert",
            "EDGECTL_CERT",
            "cert",
            "tenant client certificate (tenant.pem)",
        )
    })?;
    let key = o.key.clone().or(from_file(&file.key)).ok_or_else(|| {
        missing(
            "--key",
            "EDGECTL_KEY",
            "key",
            "tenant private key (tenant.key)",
        )
    })?;
    Ok(Resolved {
        manager,
        ca_cert,
        cert,
        key,
        config: config_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse("manager = \"x:1\"\ncacert = \"a\"\n").unwrap_err();
        assert!(err.to_string().contains("cacert"), "{err}");
    }

    #[test]
    fn dev_config_paths_are_relative_to_the_file_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path().to_path_buf();
        write(
            &cwd.join(DEV_CONFIG),
            "manager = \"127.0.0.1:9999\"\nca_cert = \"ca.pem\"\ncert = \"tenant.pem\"\nkey = \"/abs/tenant.key\"\n",
        );
        let r = resolve_in(&Overrides::default(), &cwd, None).unwrap();
        assert_eq!(r.manager, "127.0.0.1:9999");
        assert_eq!(r.ca_cert, cwd.join("edgepool-dev/ca.pem"));
        assert_eq!(r.cert, cwd.join("edgepool-dev/tenant.pem"));
        assert_eq!(r.key, PathBuf::from("/abs/tenant.key"));
        assert_eq!(r.config, Some(cwd.join(DEV_CONFIG)));

        let o = Overrides {
            manager: Some("10.0.0.1:7443".into()),
            cert: Some("mine.pem".into()),
            ..Default::default()
        };
        let r = resolve_in(&o, &cwd, None).unwrap();
        assert_eq!(r.manager, "10.0.0.1:7443");
        assert_eq!(r.cert, PathBuf::from("mine.pem"));
        assert_eq!(r.ca_cert, cwd.join("edgepool-dev/ca.pem"));
    }

    #[test]
    fn user_config_is_the_fallback_and_explicit_beats_both() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (cwd, home) = (d1.path().to_path_buf(), d2.path().to_path_buf());
        write(
            &home.join(USER_CONFIG),
            "ca_cert = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n",
        );
        let r = resolve_in(&Overrides::default(), &cwd, Some(&home)).unwrap();
        assert_eq!(r.manager, DEFAULT_MANAGER);
        assert_eq!(r.ca_cert, home.join(".config/edgectl/ca.pem"));

        let explicit = cwd.join("other.toml");
        write(
            &explicit,
            "ca_cert = \"x.pem\"\ncert = \"c\"\nkey = \"k\"\n",
        );
        let o = Overrides {
            config: Some(explicit.clone()),
            ..Default::default()
        };
        let r = resolve_in(&o, &cwd, Some(&home)).unwrap();
        assert_eq!(r.ca_cert, cwd.join("x.pem"));
        assert_eq!(r.config, Some(explicit));
    }

    #[test]
    fn missing_credentials_name_the_flag_env_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path().to_path_buf();
        let err = resolve_in(&Overrides::default(), &cwd, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--ca-cert") && err.contains("EDGECTL_CA_CERT") && err.contains("ca_cert"),
            "{err}"
        );
        let o = Overrides {
            ca_cert: Some("ca.pem".into()),
            cert: Some("t.pem".into()),
            ..Default::default()
        };
        let err = resolve_in(&o, &cwd, None).unwrap_err().to_string();
        assert!(
            err.contains("--key") && err.contains("EDGECTL_KEY"),
            "{err}"
        );

        let o = Overrides {
            config: Some(cwd.join("missing.toml")),
            ..Default::default()
        };
        let err = resolve_in(&o, &cwd, None).unwrap_err().to_string();
        assert!(err.contains("missing.toml"), "{err}");
    }
}
