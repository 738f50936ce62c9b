#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ (cargo-fuzz, libFuzzer, on the nightly
# toolchain) for FUZZ_SECONDS each (default 300), FUZZ_JOBS targets at a
# time (default 1), starting from the seeds the harness tests write and
# from the corpus of earlier runs (target/fuzz-corpus). Not run by CI: it
# takes minutes per target. Prints one line per target (executions, corpus
# size, crashes) and writes them to target/fuzz-report.txt; exits non-zero
# if any target crashed (the input is kept under fuzz/artifacts/).
#
#   scripts/fuzz.sh                      # every target, 5 minutes each
#   FUZZ_SECONDS=30 scripts/fuzz.sh certificates config_files
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-300}
jobs=${FUZZ_JOBS:-1}
all=(agent_stream tenant_requests peer_requests certificates config_files)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz.sh: needs the nightly toolchain (rustup toolchain install nightly)" >&2
    exit 2
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/target/fuzz-build}
corpus=$PWD/target/fuzz-corpus
mkdir -p "$corpus"

# Seeds: one well-formed input per path, from the harnesses' own tests.
# (One cargo invocation for both crates, so that it reuses the workspace
# build's dependencies.)
EDGEPOOL_FUZZ_SEEDS_DIR=$corpus cargo test -q --locked -p cloud-manager -p edge-agent --lib \
    fuzzing::tests::every_seed_runs >/dev/null

(cd fuzz && cargo +nightly fuzz build -O)

report=$PWD/target/fuzz-report.txt
: > "$report"
run_one() {
    local t=$1 log=$PWD/target/fuzz-$1.log
    mkdir -p "$corpus/$t"
    local rc=0
    (cd fuzz && cargo +nightly fuzz run -O "$t" "$corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=4096) >"$log" 2>&1 || rc=$?
    local execs cov files
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo 0)
    files=$(find "$corpus/$t" -type f | wc -l)
    local verdict="0 crashes"
    [ "$rc" -eq 0 ] || verdict="CRASHED (exit $rc; see $log and fuzz/artifacts/$t)"
    printf '%-16s %4ss  %10s execs  cov %5s  corpus %5s  %s\n' \
        "$t" "$secs" "$execs" "$cov" "$files" "$verdict" | tee -a "$report"
    return "$rc"
}
export -f run_one
export secs corpus report
failed=0
printf '%s\n' "${targets[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one "$@"' _ {} || failed=1
echo "report: $report"
exit $failed
