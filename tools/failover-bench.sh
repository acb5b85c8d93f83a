#!/usr/bin/env bash
# Failover performance report (issue #4), a script, not a timed test. Two twinblk nodes on this
# machine (loopback, sync protocol, both disks on the same file system), release build.
#
#   cargo build --release && tools/failover-bench.sh [--size 1G] [--dirty 64M] [--runtime 20]
#
# (i)   resync throughput: the initial full sync of --size, against fio's local sequential
#       O_DIRECT write speed (1 MiB, qd 16) on the same file system. Target >= 80 %.
# (ii)  bytes resynced vs bytes dirtied: beta disconnects, fio writes --dirty of random 4 KiB
#       blocks (random map: each block once) through alpha, beta reconnects; bytes resynced from
#       alpha's twinblk_resync_bytes_total. Target ratio <= 1.1.
# (iii) activity-log cost: 4k randwrite qd32 IOPS through alpha's NBD export (replicating to
#       beta) with an activity log that covers the whole device (1360 extents: never evicts)
#       against one that evicts on nearly every write (--al-extents 8 over the device). Target
#       <= 5 %.
# Environment: TWINBLK (binary, default target/release/twinblk), BENCH_DIR (/var/tmp: O_DIRECT).
set -euo pipefail

size=1G dirty=64M runtime=20
while [ $# -gt 0 ]; do
    case "$1" in
        --size) size=$2; shift 2 ;;
        --dirty) dirty=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "failover-bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
TW="${TWINBLK:-target/release/twinblk}"
case "$TW" in /*) ;; *) TW="$PWD/$TW" ;; esac
[ -x "$TW" ] || { echo "failover-bench: $TW not found: cargo build --release first (or set TWINBLK)" >&2; exit 1; }
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
    for ((i = 0; i < 6000; i++)); do
        n=0
        for node in alpha beta; do
            s=$(tw status "$node" --json 2>/dev/null || true)
            [ -n "$s" ] && [ "$(field "$s" repl)" = Established ] && [ "$(field "$s" disk)" = UpToDate ] &&
                [ "$(field "$s" peer_disk)" = UpToDate ] && n=$((n + 1))
        done
        [ $n = 2 ] && return 0
        sleep 0.05
    done
    fail "the nodes did not get in sync within 5 minutes"
}
setup() { # AL-EXTENTS
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
        tw create-md "$n" --al-extents "$1" >/dev/null
    done
}
start() {
    "$TW" up r0 --config "$D/r0.toml" --node "$1" >/dev/null 2>>"$D/$1.log" &
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
rm -f "$D/local.img"

setup 1360
start alpha
start beta
t0=$(now)
tw primary alpha --force >/dev/null
wait_in_sync
t1=$(now)
resync_bw=$(python3 -c "print(int($bytes / ($t1 - $t0)))")
pct_i=$(python3 -c "print(f'{100 * $resync_bw / $local_bw:.0f}')")
printf '(i)   local sequential write %s MB/s; full resync of %s: %.1f s = %s MB/s -> %s %% (target >= 80 %%)\n' \
    "$((local_bw / 1000000))" "$size" "$(python3 -c "print($t1 - $t0)")" "$((resync_bw / 1000000))" "$pct_i"

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

# (iii) 4k randwrite qd32 IOPS through alpha with a never-evicting log, then an evicting one.
iops() {
    fio_json --name=al --ioengine=nbd --uri="nbd+unix:///?socket=$D/alpha.nbd" --rw=randwrite \
        --bs=4k --iodepth=32 --size="$size" --time_based --runtime="$runtime" --ramp_time=2 \
        --randseed=13 >"$D/iops.json" || fail "fio (iops) through alpha: $(cat "$D/fio.err")"
    jget "$D/iops.json" iops
}
big=$(iops)
stop_all
setup 8
start alpha
start beta
tw primary alpha --force >/dev/null
wait_in_sync
small=$(iops)
stop_all
cost=$(python3 -c "print(f'{100 * (1 - $small / $big):.1f}')")
printf '(iii) 4k randwrite qd32: %s IOPS with 1360 extents (never evicts), %s IOPS with 8 extents (evicts on nearly every write) -> cost %s %% (target <= 5 %%)\n' \
    "$big" "$small" "$cost"
