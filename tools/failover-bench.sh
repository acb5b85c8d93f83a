#!/usr/bin/env bash
# Failover performance report (issue #4), a script, not a timed test. Two twinblk nodes on this
# machine (loopback, sync protocol, both disks on the same file system), release build.
#
#   cargo build --release && tools/failover-bench.sh [--size 1G] [--dirty 64M] [--runtime 20]
#
# (i)   resync throughput: the initial full sync of --size, against fio's local sequential
#       O_DIRECT write speed (1 MiB, qd 16) on the same file system. Target >= 80 %. Also
#       against a plain local copy (dd) between two files there, which bounds a resync between
#       two nodes sharing one device.
# (ii)  bytes resynced vs bytes dirtied: beta disconnects, fio writes --dirty of random 4 KiB
#       blocks (random map: each block once) through alpha, beta reconnects; bytes resynced from
#       alpha's twinblk_resync_bytes_total. Target ratio <= 1.1.
# (iii) activity-log cost: 4k randwrite qd32 IOPS through alpha's NBD export (replicating to
#       beta) with the activity log (default al-extents, group commit) against `al-updates =
#       false` (no activity log at all), on the same device, alternating (--rounds each), one
#       restart of both nodes between runs. Target <= 5 %. Worst case row: a log of 8 extents
#       over the device (a transaction on nearly every write) against no log; with
#       TWINBLK_BEFORE=<binary> also that binary's IOPS with the 8-extent log (e.g. a build
#       without group commit), on the same device.
# Environment: TWINBLK (binary, default target/release/twinblk), TWINBLK_BEFORE (optional),
# BENCH_DIR (/var/tmp: O_DIRECT).
set -euo pipefail

size=1G dirty=64M runtime=20 rounds=2
while [ $# -gt 0 ]; do
    case "$1" in
        --size) size=$2; shift 2 ;;
        --dirty) dirty=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "failover-bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
TW="${TWINBLK:-target/release/twinblk}"
case "$TW" in /*) ;; *) TW="$PWD/$TW" ;; esac
[ -x "$TW" ] || { echo "failover-bench: $TW not found: cargo build --release first (or set TWINBLK)" >&2; exit 1; }
BEFORE="${TWINBLK_BEFORE:-}"
case "$BEFORE" in ""|/*) ;; *) BEFORE="$PWD/$BEFORE" ;; esac
[ -z "$BEFORE" ] || [ -x "$BEFORE" ] || { echo "failover-bench: TWINBLK_BEFORE=$BEFORE is not an executable" >&2; exit 1; }
for t in fio python3 curl; do
    command -v "$t" >/dev/null || { echo "failover-bench: $t not found (apt-get install fio python3 curl)" >&2; exit 1; }
done

D=$(mktemp -d "${BENCH_DIR:-/var/tmp}/twinblk-fobench.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$D"
}
trap cleanup EXIT

bytes=$(numfmt --from=iec "$size")
dirty_bytes=$(numfmt --from=iec "$dirty")
base=$((20000 + RANDOM % 20000))
mport=(0 $((base + 10)) $((base + 11)))

tw() { local cmd=$1 node=$2; shift 2; "$TW" "$cmd" r0 --config "$D/r0.toml" --node "$node" "$@"; }
field() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d.get(sys.argv[2]))' "$1" "$2"; }
fail() { echo "failover-bench: FAILED: $*" >&2; for n in alpha beta; do tail -n 20 "$D/$n.log" >&2 || true; done; exit 1; }
now() { date +%s.%N; }
metric() { # NODE-INDEX NAME
    curl -s "http://127.0.0.1:${mport[$1]}/metrics" |
        awk -v n="$2" '$1 == n || index($1, n "{") == 1 { print $2; exit }'
}
wait_in_sync() {
    local i s n
    for ((i = 0; i < 15000; i++)); do
        n=0
        # grep, not a python per field: this loop is the clock of (i), and three interpreter
        # starts per node made each turn about 0.5 s.
        for node in alpha beta; do
            s=$(tw status "$node" --json 2>/dev/null || true)
            grep -q '"repl":"Established"' <<<"$s" && grep -q '"disk":"UpToDate"' <<<"$s" &&
                grep -q '"peer_disk":"UpToDate"' <<<"$s" && n=$((n + 1))
        done
        [ $n = 2 ] && return 0
        sleep 0.02
    done
    fail "the nodes did not get in sync within 5 minutes"
}
setup() { # [AL-EXTENTS] (default: create-md's)
    {
        printf '[resource]\nname = "r0"\nprotocol = "sync"\n'
        i=0
        for n in alpha beta; do
            printf '[node.%s]\naddress = "127.0.0.1:%d"\ndisk = "%s/%s.img"\nnbd = "unix:%s/%s.nbd"\n' \
                "$n" $((base + i)) "$D" "$n" "$D" "$n"
            printf 'admin = "%s/%s.sock"\ncert = "%s/%s.crt"\nkey = "%s/%s.key"\nsize = "%s"\nmetrics = "127.0.0.1:%d"\n' \
                "$D" "$n" "$D" "$n" "$D" "$n" "$size" "${mport[$((i + 1))]}"
            i=$((i + 1))
        done
    } >"$D/r0.toml"
    for n in alpha beta; do
        [ -f "$D/$n.key" ] || "$TW" keygen --name "$n" --out "$D" >/dev/null
        rm -f "$D/$n.img" "$D/$n.img.twinblk-meta"
        # Written extents, not holes: allocation would be measured instead of twinblk.
        fio --name=fill --filename="$D/$n.img" --size="$size" --rw=write --bs=1M --direct=1 \
            --ioengine=psync --output=/dev/null
        tw create-md "$n" ${1:+--al-extents "$1"} >/dev/null
    done
}
start() { # NODE [BINARY]
    "${2:-$TW}" up r0 --config "$D/r0.toml" --node "$1" >/dev/null 2>>"$D/$1.log" &
    PIDS+=($!)
    local i
    for ((i = 0; i < 200; i++)); do tw status "$1" --json >/dev/null 2>&1 && return 0; sleep 0.05; done
    fail "$1 did not start"
}
stop_all() {
    tw down alpha >/dev/null 2>&1 || true
    tw down beta >/dev/null 2>&1 || true
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}
# A write statistic from fio's JSON output (fio may print notes before the JSON).
jget() {
    python3 -c 'import json,sys; s=open(sys.argv[1]).read(); i=s.find("{")
if i < 0: sys.exit("fio wrote no JSON: " + s[:500])
print(int(json.loads(s[i:])["jobs"][0]["write"][sys.argv[2]]))' "$1" "$2"
}
fio_json() { # FIO-ARGS... -> prints the JSON
    fio --output-format=json "$@" 2>>"$D/fio.err"
}

echo "twinblk failover benchmark: device $size, dirty $dirty, runtime ${runtime}s, $(nproc) cores, $(uname -r)"

# (i) local sequential write speed, then the initial full sync.
fio_json --name=local --filename="$D/local.img" --size="$size" --rw=write --bs=1M --iodepth=16 \
    --ioengine=libaio --direct=1 --end_fsync=1 >"$D/local.json"
local_bw=$(jget "$D/local.json" bw_bytes)
# What a plain copy gets on this file system: a resync reads one file and writes the other on
# the same device when both nodes run here, so this, not the write speed, bounds it.
c0=$(now)
dd if="$D/local.img" of="$D/copy.img" bs=4M iflag=direct oflag=direct conv=fsync status=none
c1=$(now)
copy_bw=$(python3 -c "print(int($bytes / ($c1 - $c0)))")
rm -f "$D/local.img" "$D/copy.img"

setup
start alpha
start beta
t0=$(now)
tw primary alpha --force >/dev/null
wait_in_sync
t1=$(now)
resync_bw=$(python3 -c "print(int($bytes / ($t1 - $t0)))")
pct_i=$(python3 -c "print(f'{100 * $resync_bw / $local_bw:.0f}')")
pct_copy=$(python3 -c "print(f'{100 * $resync_bw / $copy_bw:.0f}')")
printf '(i)   local sequential write %s MB/s; full resync of %s: %.1f s = %s MB/s -> %s %% (target >= 80 %%)\n' \
    "$((local_bw / 1000000))" "$size" "$(python3 -c "print($t1 - $t0)")" "$((resync_bw / 1000000))" "$pct_i"
printf '      local copy on the same file system (dd 4M, O_DIRECT both sides) %s MB/s: the resync is %s %% of it\n' \
    "$((copy_bw / 1000000))" "$pct_copy"

# (ii) disconnect beta, dirty random 4 KiB blocks, reconnect: bytes resynced.
before=$(metric 1 twinblk_resync_bytes_total)
tw disconnect beta >/dev/null
fio --name=dirty --ioengine=nbd --uri="nbd+unix:///?socket=$D/alpha.nbd" --rw=randwrite --bs=4k \
    --iodepth=32 --size="$size" --io_size="$dirty" --randseed=11 --output=/dev/null ||
    fail "fio (dirtying) through alpha"
oos=$(field "$(tw status alpha --json)" out_of_sync_bytes)
t0=$(now)
tw connect beta >/dev/null
wait_in_sync
t1=$(now)
after=$(metric 1 twinblk_resync_bytes_total)
resynced=$(python3 -c "print(int(float('$after') - float('$before')))")
ratio=$(python3 -c "print(f'{$resynced / $dirty_bytes:.3f}')")
printf '(ii)  dirtied %s bytes (random 4k, each block once); out of sync before reconnect %s; resynced %s bytes in %.1f s -> ratio %s (target <= 1.1)\n' \
    "$dirty_bytes" "$oos" "$resynced" "$(python3 -c "print($t1 - $t0)")" "$ratio"

# (iii) 4k randwrite qd32 IOPS through alpha: with the activity log against without one
# (al-updates = false), same device, alternating; then the same with an 8-extent log.
iops() {
    fio_json --name=al --ioengine=nbd --uri="nbd+unix:///?socket=$D/alpha.nbd" --rw=randwrite \
        --bs=4k --iodepth=32 --size="$size" --time_based --runtime="$runtime" --ramp_time=2 \
        --randseed=13 >"$D/iops.json" || fail "fio (iops) through alpha: $(cat "$D/fio.err")"
    jget "$D/iops.json" iops
}
# Both nodes down (clean), then up with al-updates = $1 (the key is left out for "true", so
# an older binary reads the file too) and binary $2; alpha Primary, in sync again. Not in a
# $(subshell): the daemons must stay children of this shell, so stop_all can wait for them.
run_mode() { # true|false [BINARY] -> sets $got (IOPS)
    stop_all
    sed -i '/^al-updates/d' "$D/r0.toml"
    [ "$1" = true ] || sed -i 's/^protocol = "sync"$/&\nal-updates = false/' "$D/r0.toml"
    start alpha "${2:-}"
    start beta "${2:-}"
    tw primary alpha >/dev/null || fail "alpha did not become Primary after the restart"
    wait_in_sync
    got=$(iops)
}
mean() { python3 -c 'import sys; v=[float(x) for x in sys.argv[1:]]; print(int(sum(v)/len(v)))' "$@"; }
pct() { python3 -c "print(f'{100 * (1 - $1 / $2):.1f}')"; }
al=() noal=()
for ((r = 0; r < rounds; r++)); do
    run_mode true; al+=("$got")
    run_mode false; noal+=("$got")
done
stop_all
al_m=$(mean "${al[@]}") noal_m=$(mean "${noal[@]}")
printf '(iii) 4k randwrite qd32, %s x %ss each, alternating:\n' "$rounds" "$runtime"
printf '      activity log (1024 extents, group commit) %8s IOPS  runs: %s\n' "$al_m" "${al[*]}"
printf '      al-updates = false (no log)               %8s IOPS  runs: %s\n' "$noal_m" "${noal[*]}"
printf '      -> cost of the activity log %s %% (target <= 5 %%); ratio %s\n' "$(pct "$al_m" "$noal_m")" \
    "$(python3 -c "print(f'{$al_m / $noal_m:.3f}')")"

setup 8
start alpha
start beta
tw primary alpha --force >/dev/null
wait_in_sync
al8=() noal8=() before8=()
for ((r = 0; r < rounds; r++)); do
    run_mode true; al8+=("$got")
    run_mode false; noal8+=("$got")
    if [ -n "$BEFORE" ]; then run_mode true "$BEFORE"; before8+=("$got"); fi
done
stop_all
al8_m=$(mean "${al8[@]}") noal8_m=$(mean "${noal8[@]}")
printf '      worst case, 8-extent log over the device:\n'
printf '      8 extents, group commit                   %8s IOPS  runs: %s\n' "$al8_m" "${al8[*]}"
if [ -n "$BEFORE" ]; then
    b_m=$(mean "${before8[@]}")
    printf '      8 extents, TWINBLK_BEFORE                 %8s IOPS  runs: %s\n' "$b_m" "${before8[*]}"
fi
printf '      al-updates = false (no log)               %8s IOPS  runs: %s\n' "$noal8_m" "${noal8[*]}"
printf '      -> cost of the 8-extent log %s %%' "$(pct "$al8_m" "$noal8_m")"
[ -z "$BEFORE" ] || printf ' (TWINBLK_BEFORE: %s %%)' "$(pct "$b_m" "$noal8_m")"
printf '\n'
