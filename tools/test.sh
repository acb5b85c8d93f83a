#!/usr/bin/env bash
# The project's test command (README "Test"): formatting, lints, then every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The kernel-attached path (ublk and nbd drivers) in a small VM; the debug binaries cargo test
# just built are enough, and avoid a release build in CI.
TWINBLK_VM_PROFILE=dev tools/vm-test.sh all
