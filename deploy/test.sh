#!/usr/bin/env bash
# Runs the whole ferry test suite on this machine: installs or starts what the
# tests need (deploy/test-deps.sh, idempotent), then format, lint, build, test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Keep one build cache across clones of the repository (CI clones afresh).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferry/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

source deploy/toolchain.sh
bash deploy/test-deps.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> build binaries"
cargo build --workspace --bins --locked
echo "==> deploy checks (compose, HAProxy, RabbitMQ definitions, systemd units, FERRY_* variables)"
bash deploy/check-deploy.sh
echo "==> tests"
log=$(mktemp)
set +e
cargo test --workspace --locked -- --test-threads "${FERRY_TEST_THREADS:-4}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One plain summary line over all test binaries.
grep -E '^test result:' "$log" | awk '{p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}'
rm -f "$log"
exit "$status"
