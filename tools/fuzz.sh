#!/usr/bin/env bash
# Builds one fuzz target of fuzz/ with libFuzzer's coverage instrumentation on the stable
# toolchain, and runs it.
#
#   tools/fuzz.sh TARGET [SECONDS] [LIBFUZZER-OPTIONS...]     # TARGET: nbd_codec, meta, wire
#   tools/fuzz.sh wire 600 -jobs=1
#   tools/fuzz.sh meta 0 fuzz/artifacts/meta/crash-…          # replay one input (SECONDS 0: no limit)
#
# cargo-fuzz (`cargo fuzz run TARGET`) needs nightly for -Zsanitizer; this script passes the same
# coverage flags by hand (they are stable codegen options), with debug assertions and overflow
# checks on as cargo-fuzz has them, without AddressSanitizer (the targets are safe Rust; the
# unsafe blocks they reach are in the disk buffer pool). The corpus grows in fuzz/corpus/TARGET
# (seeded from fuzz/seeds/TARGET when that exists), crashes land in fuzz/artifacts/TARGET.
# Environment: CARGO_TARGET_DIR (default fuzz/target).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

target=${1:?usage: tools/fuzz.sh TARGET [SECONDS] [LIBFUZZER-OPTIONS...] (TARGET: nbd_codec, meta, wire)}
secs=${2:-60}
shift $(($# < 2 ? $# : 2))
case "$target" in nbd_codec | meta | wire) ;; *)
    echo "fuzz: unknown target '$target': one of nbd_codec, meta, wire" >&2
    exit 2
    ;;
esac
triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build --release --bin "$target" --target "$triple"
bin="${CARGO_TARGET_DIR:-target}/$triple/release/$target"
mkdir -p "corpus/$target" "artifacts/$target"
dirs=("corpus/$target")
[ -d "seeds/$target" ] && dirs+=("seeds/$target")
# A file argument replays it; otherwise fuzz the corpus for SECONDS.
if [ $# -gt 0 ] && [ -f "${!#}" ]; then exec "$bin" "$@"; fi
# Inputs past libFuzzer's default 4096 bytes: the wire target reassembles frames from 4096 bytes
# on in aligned pool memory, and a metadata area with its activity-log ring is 80 KiB (the
# seeds are real ones).
max_len=()
case "$target" in
wire) max_len=(-max_len=20000) ;;
meta) max_len=(-max_len=81920) ;;
esac
exec "$bin" -max_total_time="$secs" -artifact_prefix="artifacts/$target/" -print_final_stats=1 \
    "${max_len[@]}" "$@" "${dirs[@]}"
