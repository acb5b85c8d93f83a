#!/usr/bin/env bash
# ublk against the kernel's NBD driver, natively, on a machine whose kernel has both (Linux >= 6.0;
# modprobe ublk_drv nbd). Same file, same fio jobs, alternating; prints the ublk/nbd ratios.
# The VM test (tools/vm-test.sh ublk) runs the same comparison in a guest, where only ratios mean
# anything; published ublk numbers elsewhere show about 1.6x NBD's IOPS on real hardware.
#
#   sudo tools/bench-kernel.sh [--file /var/tmp/twinblk-kbench.img] [--size 1G] [--runtime 20]
set -euo pipefail
file=/var/tmp/twinblk-kbench.img size=1G runtime=20
while [ $# -gt 0 ]; do
    case "$1" in
        --file) file=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        *) echo "usage: $0 [--file PATH] [--size 1G] [--runtime SECONDS]" >&2; exit 2 ;;
    esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
twinblk=${TWINBLK:-$root/target/release/twinblk}
[ -x "$twinblk" ] || (cd "$root" && cargo build --release --quiet)
[ -e /dev/ublk-control ] || { echo "no /dev/ublk-control: modprobe ublk_drv (Linux >= 6.0)" >&2; exit 1; }
[ -e /dev/nbd0 ] || { echo "no /dev/nbd0: modprobe nbd" >&2; exit 1; }
command -v nbd-client >/dev/null || { echo "nbd-client missing: apt-get install nbd-client" >&2; exit 1; }
command -v fio >/dev/null || { echo "fio missing: apt-get install fio" >&2; exit 1; }
[ -f "$file" ] || fio --name=fill --filename="$file" --size="$size" --rw=write --bs=1M --direct=1 --output=/dev/null

jobs=("randwrite4k --rw=randwrite --bs=4k --iodepth=32" "seqwrite1m --rw=write --bs=1M --iodepth=8")
run_fio() { # DEV NAME ARGS... -> prints "iops bw_kib"
    local dev=$1 name=$2; shift 2
    fio --name="$name" --filename="$dev" --ioengine=libaio --direct=1 "$@" --size="$size" \
        --time_based --runtime="$runtime" --minimal | awk -F';' '{print $49, $48}'
}

declare -A result
for round in 1 2; do
    out=$(mktemp)
    "$twinblk" serve --disk "$file" --ublk --queues 2 --depth 128 >"$out" &
    pid=$!
    for _ in $(seq 100); do grep -q '^ublk device ' "$out" && break; sleep 0.1; done
    dev=$(sed -n 's/^ublk device //p' "$out")
    for j in "${jobs[@]}"; do set -- $j; name=$1; shift; result[ublk-$name-$round]=$(run_fio "$dev" "$name" "$@"); done
    kill -TERM "$pid"; wait "$pid"

    sock=$(mktemp -u /tmp/twinblk-kbench.XXXXXX.sock)
    "$twinblk" serve --disk "$file" --listen "unix:$sock" >/dev/null &
    pid=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
    nbd-client -unix "$sock" /dev/nbd0 -connections 2 >/dev/null
    for j in "${jobs[@]}"; do set -- $j; name=$1; shift; result[nbd-$name-$round]=$(run_fio /dev/nbd0 "$name" "$@"); done
    nbd-client -d /dev/nbd0 >/dev/null
    kill -TERM "$pid"; wait "$pid"
    rm -f "$out"
done

printf '%-12s %14s %14s %10s\n' job ublk nbd ublk/nbd
for j in "${jobs[@]}"; do
    set -- $j; name=$1
    u=0 n=0
    for round in 1 2; do
        read -r ui ub <<<"${result[ublk-$name-$round]}"; read -r ni nb <<<"${result[nbd-$name-$round]}"
        if [ "$name" = seqwrite1m ]; then u=$((u + ub)); n=$((n + nb)); else u=$((u + ui)); n=$((n + ni)); fi
    done
    unit=IOPS; [ "$name" = seqwrite1m ] && unit=KiB/s
    printf '%-12s %14s %14s %10s\n' "$name" "$((u / 2)) $unit" "$((n / 2)) $unit" "$(awk "BEGIN{printf \"%.2f\", $u/$n}")"
done
