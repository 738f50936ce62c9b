#!/bin/sh
# Autonomy soak (issue 14; not in CI): three real agents keep a pool running
# while their manager is black-holed for an hour, past their member
# certificates' lifetime, with load that makes them offload, and one agent
# restarted mid-cut. Prints restarts (expected 0), offloads and the time to
# converge after the heal. Arguments go to soak-autonomy:
#   scripts/soak-autonomy.sh [--cut-seconds 3600] [--cert-seconds 60]
#                            [--restart-at-seconds N]
# SOAK_PROFILE=debug uses the debug build instead of the release one.
set -eu
cd "$(dirname "$0")/.."
profile="${SOAK_PROFILE:-release}"
if [ "$profile" = release ]; then
    cargo build --release --workspace --bins
else
    cargo build --workspace --bins
fi
target="${CARGO_TARGET_DIR:-target}"
exec "$target/$profile/soak-autonomy" "$@"
