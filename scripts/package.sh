#!/usr/bin/env bash
# Builds the Debian packages with cargo-deb and prints their paths:
#   cloud-manager  /usr/bin/cloud-manager, /usr/bin/edgectl, cloud-manager.service,
#                  /etc/edgepool/manager.toml (conffile), user edgepool
#   edge-agent     /usr/bin/edge-agent, edge-agent.service,
#                  /etc/edgepool/agent.toml (conffile), user edge-agent
# Unit files, default configs and maintainer scripts live in packaging/; the
# package metadata in [package.metadata.deb] of cloud-manager/Cargo.toml and
# edge-agent/Cargo.toml. Installing and running them: docs/install.md.
#
#   scripts/package.sh             release build, then both .deb files
#   scripts/package.sh --no-build  package the binaries already in
#                                  target/release (quick check of the packaging)
#   scripts/package.sh --fast      faster, lighter compression (bigger .deb files)
#   scripts/package.sh --check     then check what the packages hold: binaries
#                                  in /usr/bin that run, conffiles, units that
#                                  pass `systemd-analyze verify` (scripts/test.sh
#                                  runs `--fast --check`)
#
# Installs cargo-deb (`cargo install cargo-deb --locked`) when it is missing.
# Needs the Rust toolchain and dpkg (Debian or Ubuntu). Output: target/debian/.
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
check=0
deb_flags=()
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    --fast) deb_flags+=(--fast) ;;
    --check) check=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "scripts/package.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf '\n==> %s\n' "$*" >&2; }

if ! cargo deb --version >/dev/null 2>&1; then
  say "installing cargo-deb"
  cargo install cargo-deb --locked
fi
cargo deb --version >&2

packages=(cloud-manager edge-agent)

if [ "$build" -eq 1 ]; then
  say "release build"
  cargo build --release --locked --bins -p cloud-manager -p edge-agent
else
  for bin in cloud-manager edgectl edge-agent; do
    if [ ! -x "target/release/$bin" ]; then
      echo "scripts/package.sh: target/release/$bin is missing: run without --no-build" >&2
      exit 1
    fi
  done
fi

debs=()
for p in "${packages[@]}"; do
  say "cargo deb -p $p"
  # cargo-deb prints the path of the package it wrote as its last line.
  out=$(cargo deb -p "$p" --no-build --locked "${deb_flags[@]}")
  deb=$(printf '%s\n' "$out" | tail -n 1)
  if [ ! -f "$deb" ]; then
    printf '%s\n' "$out" >&2
    echo "scripts/package.sh: cargo deb -p $p wrote no package" >&2
    exit 1
  fi
  debs+=("$deb")
done

say "packages"
for deb in "${debs[@]}"; do
  echo "$deb"
done

# --check: look inside each package as dpkg would install it.
check_package() {
  local deb=$1 name bins conffile unit root
  name=$(dpkg-deb -f "$deb" Package)
  case "$name" in
    cloud-manager) bins="cloud-manager edgectl"; conffile=/etc/edgepool/manager.toml ;;
    edge-agent) bins="edge-agent"; conffile=/etc/edgepool/agent.toml ;;
    *) echo "check: unexpected package $name in $deb" >&2; return 1 ;;
  esac
  root=$(mktemp -d)
  trap 'rm -rf "$root"' RETURN
  dpkg-deb -x "$deb" "$root"
  for b in $bins; do
    "$root/usr/bin/$b" --version >/dev/null || { echo "check: $name: /usr/bin/$b does not run" >&2; return 1; }
  done
  dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx "$conffile" \
    || { echo "check: $name: $conffile is not a conffile" >&2; return 1; }
  [ -f "$root$conffile" ] || { echo "check: $name: $conffile missing" >&2; return 1; }
  unit="$root/usr/lib/systemd/system/$name.service"
  [ -f "$unit" ] || { echo "check: $name: no unit in /usr/lib/systemd/system" >&2; return 1; }
  dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./postinst | grep -q adduser \
    || { echo "check: $name: postinst creates no system user" >&2; return 1; }
  # systemd-analyze checks that ExecStart exists: point it at the packaged
  # binary; it must print nothing (it warns without failing otherwise).
  sed -e "s#/usr/bin/#$root/usr/bin/#g" "$unit" > "$root/$name.service"
  out=$(systemd-analyze verify "$root/$name.service" 2>&1) || true
  if [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    echo "check: $name: systemd-analyze verify complained" >&2
    return 1
  fi
  echo "check: $name ok ($(du -k "$deb" | cut -f1) KiB)" >&2
}

if [ "$check" -eq 1 ]; then
  say "checking the packages"
  for deb in "${debs[@]}"; do
    check_package "$deb"
  done
fi
