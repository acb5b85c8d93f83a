#!/usr/bin/env bash
# A guided two-node twinblk demo on this machine: replicate, lose the Primary, fail over, bring
# the old Primary back, resync, and check that both copies are identical.
#
#   cargo build --release && tools/demo.sh
#
# Environment: TWINBLK (binary, default target/release/twinblk), DEMO_SIZE (device, 256M),
# FIO_SIZE (data written, 64M), DEMO_DIR (parent of the work directory, /var/tmp: the disks use
# O_DIRECT, which tmpfs refuses), KEEP=1 keeps the work directory. Needs fio (Debian: fio).
set -euo pipefail
cd "$(dirname "$0")/.."

TW="${TWINBLK:-target/release/twinblk}"
case "$TW" in /*) ;; *) TW="$PWD/$TW" ;; esac
DEMO_SIZE="${DEMO_SIZE:-256M}"
FIO_SIZE="${FIO_SIZE:-64M}"

[ -x "$TW" ] || { echo "demo: $TW not found: run 'cargo build --release' first (or set TWINBLK)" >&2; exit 1; }
command -v fio >/dev/null || { echo "demo: fio not found: apt-get install fio" >&2; exit 1; }

D=$(mktemp -d "${DEMO_DIR:-/var/tmp}/twinblk-demo.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    if [ "${KEEP:-0}" = 1 ]; then echo "demo: work directory kept: $D"; else rm -rf "$D"; fi
}
trap cleanup EXIT

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
tw() { local cmd=$1 node=$2; shift 2; "$TW" "$cmd" r0 --config "$D/r0.toml" --node "$node" "$@"; }
status() { printf -- '--- twinblk status (%s) ---\n' "$1"; tw status "$1" || true; }
json() { tw status "$1" --json 2>/dev/null || true; }
# A string field of the one-line status JSON (see tools/ocf/twinblk for why sed suffices).
field() { sed -n "s/.*\"$2\":\"\([^\"]*\)\".*/\1/p" <<<"$1"; }
fail() { echo "demo: FAILED: $*" >&2; for n in alpha beta; do echo "--- $n log (tail) ---" >&2; tail -n 20 "$D/$n.log" >&2 || true; done; exit 1; }
# wait_for NODE WHAT CONDITION-ON-$s (seconds bounded: a stuck demo says what it waited for).
wait_for() {
    local node=$1 what=$2 cond=$3 i
    for ((i = 0; i < 600; i++)); do
        s=$(json "$node")
        if [ -n "$s" ] && eval "$cond"; then return 0; fi
        sleep 0.2
    done
    fail "$node: waited 2 minutes for $what; last status: $s"
}
in_sync() {
    for n in alpha beta; do
        wait_for "$n" "Established with both disks UpToDate" \
            '[ "$(field "$s" repl)" = Established ] && [ "$(field "$s" disk)" = UpToDate ] && [ "$(field "$s" peer_disk)" = UpToDate ]'
    done
}
start() {
    "$TW" up r0 --config "$D/r0.toml" --node "$1" >/dev/null 2>>"$D/$1.log" &
    PIDS+=($!)
    eval "PID_$1=$!"
    wait_for "$1" "the daemon to answer" 'true'
}
fio_job() {
    local node=$1
    shift
    (cd "$D" && fio --name=demo --ioengine=nbd --uri="nbd+unix:///r0?socket=$D/$node.nbd" \
        --rw=write --bs=64k --iodepth=16 --size="$FIO_SIZE" --verify=crc32c \
        "$@" >"$D/fio-$node.out" 2>&1) ||
        { cat "$D/fio-$node.out"; fail "fio through $node"; }
    # fio's summary lines (WRITE: for the writes, READ: for the verification reads).
    grep -E '^ *(WRITE|READ):' "$D/fio-$node.out" | sed 's/^ */fio: /'
    echo "fio: ok, no verification errors"
}

bold "1. two nodes on this machine: keys, resource file, metadata (in $D)"
for n in alpha beta; do run "$TW" keygen --name "$n" --out "$D" >/dev/null; done
base=$((20000 + RANDOM % 20000))
{
    printf '[resource]\nname = "r0"\nprotocol = "sync"\ntimeout = "2s"\nping-interval = "500ms"\n'
    i=0
    for n in alpha beta; do
        printf '[node.%s]\naddress = "127.0.0.1:%d"\ndisk = "%s/%s.img"\nnbd = "unix:%s/%s.nbd"\n' \
            "$n" $((base + i)) "$D" "$n" "$D" "$n"
        printf 'admin = "%s/%s.sock"\ncert = "%s/%s.crt"\nkey = "%s/%s.key"\nsize = "%s"\n' \
            "$D" "$n" "$D" "$n" "$D" "$n" "$DEMO_SIZE"
        i=$((i + 1))
    done
} >"$D/r0.toml"
cat "$D/r0.toml"
for n in alpha beta; do run tw create-md "$n"; done

bold "2. twinblk up on both nodes"
start alpha
start beta
status alpha

bold "3. alpha becomes the first Primary: beta is fully synced from it"
run tw primary alpha --force
in_sync
status alpha

bold "4. fio writes $FIO_SIZE through alpha's NBD export, with verification"
fio_job alpha --do_verify=1
status alpha

bold "5. alpha crashes (kill -9)"
run kill -9 "$PID_alpha"
wait "$PID_alpha" 2>/dev/null || true
wait_for beta "the connection loss" '[ "$(field "$s" repl)" != Established ]'
status beta

bold "6. beta is promoted (its disk is UpToDate: no --force needed)"
run tw primary beta
status beta

bold "7. the data written through alpha, verified through beta's NBD export"
fio_job beta --verify_only
status beta

bold "8. alpha comes back: as Secondary, and resyncs from beta"
start alpha
wait_for alpha "alpha to reconnect (or be refused)" \
    '[ "$(field "$s" repl)" != Connecting ] && { [ "$(field "$s" repl)" != StandAlone ] || [ -n "$(field "$s" last_refusal)" ]; }'
refusal=$(field "$s" last_refusal)
[ "$(field "$s" repl)" = StandAlone ] && [ -n "$refusal" ] &&
    fail "the handshake refused the returning alpha: $refusal"
[ "$(field "$(json alpha)" role)" = Secondary ] || fail "alpha did not come back Secondary"
if "$TW" help wait-sync >/dev/null 2>&1; then
    run tw wait-sync beta
else
    # A progress bar from beta's status (the sync source reports blocks left/total).
    last=-1
    while :; do
        s=$(json beta)
        [ "$(field "$s" repl)" = Established ] && [ "$(field "$s" peer_disk)" = UpToDate ] && break
        pct=$(sed -n 's/.*"percent":\([0-9.]*\).*/\1/p' <<<"$s")
        pct=${pct%%.*}
        pct=${pct:-0}
        if [ "$pct" != "$last" ]; then
            bar=$(printf '%*s' $((pct / 2)) '' | tr ' ' '#')
            printf '\rresync [%-50s] %3d%%' "$bar" "$pct"
            last=$pct
        fi
        sleep 0.2
    done
    printf '\rresync [%-50s] 100%%\n' "$(printf '%*s' 50 '' | tr ' ' '#')"
fi
in_sync
status alpha
status beta

bold "9. twinblk down on both, then compare the two disks"
run tw down beta
run tw down alpha
for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
run cmp "$D/alpha.img" "$D/beta.img" || fail "the two copies differ"
echo
echo "demo passed: the copies are identical after a crash, a failover and a resync"
