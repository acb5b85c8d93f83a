#!/usr/bin/env bash
# Side-by-side fio benchmark: twinblk against qemu-nbd on the same file, in one invocation,
# alternating runs so that drift on a shared machine hits both alike. Prints a table of ratios.
#
#   tools/bench.sh [--runtime SECONDS] [--rounds N] [--size 1G] [--file PATH] [--only NAME,...]
#
# Columns: every server in SERVERS (default: qemu-nbd and twinblk serve). Ratios are against the
# first column. Servers: qemu-nbd, twinblk (default engine), twinblk-uring, twinblk-inline,
# twinblk-threads, twinblk-nopoll (serve --poll-us $BENCH_POLL_US, 0 unless set: the default
# engine without polling), twinblk-sync/twinblk-async (a replicated pair), twinblk-sync-nolat
# (the sync pair with TWINBLK_LATENCY=off: what the latency breakdown costs), twinblk-sync-nopoll
# (TWINBLK_POLL_US=0: the event loops never busy-poll), twinblk-sync-apoll
# (TWINBLK_POLL_US=${BENCH_POLL_US:-100} and $BENCH_POLL_ENV: the adaptive busy-poll, see
# src/node/poll.rs), twinblk-sync-poll (the same with TWINBLK_POLL_MODE=always: spin whenever a
# write is in flight), twinblk-sync-dpoll (TWINBLK_DISK_POLL_US=${BENCH_POLL_US:-100}:
# the disk engine's deep-queue polling, as `serve` has it), twinblk-sync-noidle and
# twinblk-async-noidle (the pair with idle-poll = "off": idle CPUs halt between a write's steps;
# BENCH_IDLE_POLL sets idle-poll for the other pair columns, see src/node/idle_poll.rs), qemu-mirror
# (qemu's own replication in userspace: qemu-storage-daemon exports the file over NBD with an
# active blockdev-mirror, copy-mode=write-blocking, to a qemu-nbd secondary on a second file:
# a write completes once both have it, as in protocol sync). Two columns are not
# servers but bounds, fio with io_uring straight on the files: one-writer (the device alone) and
# two-writers (two files written at once, the value per writer). A replicated pair whose disks
# share one device writes every block twice, so two-writers is the most any pair can reach here,
# with NBD, QUIC and TLS costing nothing.
# The qd1 latency workload reports the mean (lat_us) and, on a row of its own, the 99th
# percentile of fio's completion latency (p99_us). Every server's workloads also get a cpu_us
# row: the server's CPU time (both daemons of a pair, user + system) per write. Each run's log
# line on stderr has the load average and the runnable tasks before it.
# BENCH_LATENCY=FILE appends the pairs' `status --latency` after each run to FILE, and with
# BENCH_LOG_LEVEL=info (the pairs' log level, default warn) their busy-poll counts.
# A server written SERVER@BINARY (e.g. twinblk-sync@/var/tmp/twinblk-before) runs that twinblk
# binary instead of TWINBLK: two builds compared in the same run, alternating within each round.
# Needs: fio (with the nbd engine), qemu-nbd, python3, a release build of twinblk;
# qemu-storage-daemon for qemu-mirror.
set -euo pipefail

runtime=15 rounds=2 size=1G file=/var/tmp/twinblk-bench.img only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) runtime=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --file) file=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#'; exit 0 ;;
        *) echo "bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
twinblk=${TWINBLK:-$root/target/release/twinblk}
default_twinblk=$twinblk
for tool in fio qemu-nbd python3; do
    command -v "$tool" >/dev/null || { echo "bench.sh: $tool is missing (apt-get install fio qemu-utils python3)" >&2; exit 1; }
done
[ -x "$twinblk" ] || (cd "$root" && cargo build --release --quiet)

work=$(mktemp -d /var/tmp/twinblk-bench.XXXXXX)
server_pid="" peer_pid="" nolat="" pair_env="" idle_poll=""
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    [ -n "$peer_pid" ] && kill "$peer_pid" 2>/dev/null && wait "$peer_pid" 2>/dev/null
    rm -f "$file.twinblk-meta"
    rm -rf "$work"
}
trap cleanup EXIT

# Written extents, not a sparse file: the first write to a hole costs the file system more than
# the servers under test, and would favour whichever runs second.
prepare() {
    if [ ! -f "$1" ] || [ "$(stat -c %s "$1")" -ne "$(numfmt --from=iec "$size")" ]; then
        echo "preparing $1 ($size)..." >&2
        rm -f "$1"
        fio --name=fill --filename="$1" --size="$size" --rw=write --bs=1M --direct=1 \
            --ioengine=psync --end_fsync=1 --output=/dev/null
    fi
}
prepare "$file"
second=$work/second.img

sock=$work/nbd.sock
uri="nbd+unix:///?socket=$sock"

wait_socket() {
    # Up to 60 s: on a machine shared with builds, a daemon's start can take seconds.
    for _ in $(seq 1 600); do
        [ -S "$sock" ] && nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "bench.sh: server did not come up on $sock; its logs, if any:" >&2
    cat "$work"/*.log >&2 2>/dev/null || true
    return 1
}

start_server() {
    rm -f "$sock"
    case "$1" in
        qemu-nbd)
            qemu-nbd -f raw --cache=none --aio=io_uring -t -k "$sock" "$file" & ;;
        twinblk)
            "$twinblk" serve --disk "$file" --listen "unix:$sock" --log-level warn >/dev/null & ;;
        twinblk-uring)
            "$twinblk" serve --disk "$file" --listen "unix:$sock" --engine uring --log-level warn >/dev/null & ;;
        twinblk-inline)
            "$twinblk" serve --disk "$file" --listen "unix:$sock" --engine uring-inline --log-level warn >/dev/null & ;;
        twinblk-threads)
            "$twinblk" serve --disk "$file" --listen "unix:$sock" --engine threads --log-level warn >/dev/null & ;;
        twinblk-nopoll)
            "$twinblk" serve --disk "$file" --listen "unix:$sock" --poll-us "${BENCH_POLL_US:-0}" --log-level warn >/dev/null & ;;
        twinblk-sync|twinblk-async)
            start_pair "${1#twinblk-}"; return ;;
        twinblk-sync-nolat)
            nolat=1 start_pair sync; return ;;
        twinblk-sync-nopoll)
            pair_env="TWINBLK_POLL_US=0" start_pair sync; return ;;
        twinblk-sync-noidle)
            idle_poll=off start_pair sync; return ;;
        twinblk-async-noidle)
            idle_poll=off start_pair async; return ;;
        twinblk-sync-apoll)
            pair_env="TWINBLK_POLL_US=${BENCH_POLL_US:-100} ${BENCH_POLL_ENV:-}" start_pair sync; return ;;
        twinblk-sync-poll)
            pair_env="TWINBLK_POLL_US=${BENCH_POLL_US:-100} TWINBLK_POLL_MODE=always" start_pair sync; return ;;
        twinblk-sync-dpoll)
            pair_env="TWINBLK_DISK_POLL_US=${BENCH_POLL_US:-100}" start_pair sync; return ;;
        qemu-mirror)
            start_mirror; return ;;
        *) echo "bench.sh: unknown server $1" >&2; exit 2 ;;
    esac
    server_pid=$!
    wait_socket
}

# Two `twinblk up` daemons on this machine: alpha (Primary) on $file, serving NBD on $sock; beta on
# a second file in $work (kept across rounds, so only the first start runs a full initial sync).
# BENCH_MTU sets the resource's max-mtu (default 6500, the daemon's default: discovery then finds
# 6500 on loopback; 1452 models a 1500-byte Ethernet replication link).
start_pair() {
    local proto=$1 p0=$((20000 + RANDOM % 20000)) n
    # idle-poll: the daemon's default unless a column or BENCH_IDLE_POLL sets it (unset, the
    # file also suits a SERVER@BINARY build older than the key).
    local idle=${idle_poll:-${BENCH_IDLE_POLL:-}}
    [ -f "$work/alpha.key" ] || for n in alpha beta; do
        "$twinblk" keygen --name "$n" --out "$work" >/dev/null 2>&1
    done
    cat > "$work/r0.toml" <<EOF2
[resource]
name = "r0"
protocol = "$proto"
max-mtu = ${BENCH_MTU:-6500}
${idle:+idle-poll = \"$idle\"}
[node.alpha]
address = "127.0.0.1:$p0"
disk = "$file"
nbd = "unix:$sock"
admin = "$work/alpha.sock"
cert = "$work/alpha.crt"
key = "$work/alpha.key"
[node.beta]
address = "127.0.0.1:$((p0 + 1))"
disk = "$work/beta.img"
nbd = "unix:$work/beta.nbd"
admin = "$work/beta.sock"
cert = "$work/beta.crt"
key = "$work/beta.key"
size = "$size"
EOF2
    rm -f "$work"/alpha.img* "$work"/beta.img*
    "$twinblk" create-md r0 --config "$work/r0.toml" --node alpha --force >/dev/null
    "$twinblk" create-md r0 --config "$work/r0.toml" --node beta --force >/dev/null
    # Logs to files: the refusals before `primary --force` are expected, not news.
    local lat=on
    [ -n "${nolat:-}" ] && lat=off
    # shellcheck disable=SC2086
    env TWINBLK_LATENCY=$lat ${pair_env:-} "$twinblk" up r0 --config "$work/r0.toml" --node beta --log-level "${BENCH_LOG_LEVEL:-warn}" >/dev/null 2>"$work/beta.log" &
    peer_pid=$!
    # shellcheck disable=SC2086
    env TWINBLK_LATENCY=$lat ${pair_env:-} "$twinblk" up r0 --config "$work/r0.toml" --node alpha --log-level "${BENCH_LOG_LEVEL:-warn}" >/dev/null 2>"$work/alpha.log" &
    server_pid=$!
    # A Secondary refuses to open its export: wait for the admin socket, promote, then the export.
    for _ in $(seq 1 600); do
        "$twinblk" status r0 --config "$work/r0.toml" --node alpha >/dev/null 2>&1 && break
        sleep 0.1
    done
    "$twinblk" primary r0 --config "$work/r0.toml" --node alpha --force >/dev/null
    wait_socket
    echo "waiting for the initial sync ($proto)..." >&2
    for _ in $(seq 1 3000); do
        "$twinblk" status r0 --config "$work/r0.toml" --node beta --json 2>/dev/null |
            grep -q '"disk":"UpToDate".*"repl":"Established"' && return 0
        sleep 0.2
    done
    echo "bench.sh: the pair did not get in sync; its logs:" >&2
    cat "$work/alpha.log" "$work/beta.log" >&2
    return 1
}

# qemu's active mirror: qemu-nbd serves the secondary file; qemu-storage-daemon serves $file
# over NBD on $sock and mirrors it there (sync=full, then every write goes to both before it
# completes: copy-mode=write-blocking). The job must be ready (the first copy done) before fio.
start_mirror() {
    command -v qemu-storage-daemon >/dev/null || { echo "bench.sh: qemu-storage-daemon is missing (apt-get install qemu-utils)" >&2; exit 1; }
    prepare "$second"
    rm -f "$work/mirror.sock" "$work/qmp.sock"
    qemu-nbd -f raw --cache=none --aio=io_uring -t -k "$work/mirror.sock" "$second" &
    peer_pid=$!
    for _ in $(seq 1 100); do [ -S "$work/mirror.sock" ] && break; sleep 0.1; done
    qemu-storage-daemon \
        --chardev "socket,path=$work/qmp.sock,server=on,wait=off,id=qmp0" --monitor chardev=qmp0 \
        --blockdev "driver=file,node-name=file0,filename=$file,cache.direct=on,aio=io_uring" \
        --blockdev "driver=raw,node-name=src,file=file0" \
        --nbd-server "addr.type=unix,addr.path=$sock" \
        --export "type=nbd,id=exp0,node-name=src,name=,writable=on" >"$work/qsd.log" 2>&1 &
    server_pid=$!
    wait_socket
    python3 - "$work/qmp.sock" "$work/mirror.sock" <<'PY' || { cat "$work/qsd.log" >&2; return 1; }
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()  # greeting
def cmd(name, **args):
    f.write(json.dumps({"execute": name, "arguments": args}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r: return r["return"]
        if "error" in r: sys.exit(f"qmp {name}: {r['error']}")
cmd("qmp_capabilities")
cmd("blockdev-add", driver="nbd", **{"node-name": "tgt"},
    server={"type": "unix", "path": sys.argv[2]}, export="")
cmd("blockdev-mirror", **{"job-id": "m0", "copy-mode": "write-blocking"},
    device="src", target="tgt", sync="full")
for _ in range(3000):
    jobs = cmd("query-block-jobs")
    if jobs and jobs[0].get("ready"): sys.exit(0)
    time.sleep(0.1)
sys.exit("the mirror job did not become ready")
PY
}

# BENCH_LATENCY=FILE: after each run of a replicated pair, append both nodes' `status --latency`
# over the run to FILE (the breakdown of where its writes' time went).
breakdown() {
    [ -n "${BENCH_LATENCY:-}" ] && [ -f "$work/r0.toml" ] && [ -n "$peer_pid" ] || return 0
    case "$2" in twinblk-sync*|twinblk-async*) ;; *) return 0 ;; esac
    {
        echo "== $1 round $3 $2"
        for n in alpha beta; do
            "$twinblk" status r0 --config "$work/r0.toml" --node "$n" --latency --seconds "$((runtime + 2))" 2>&1 || true
        done
    } >> "$BENCH_LATENCY"
}

stop_server() {
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
    if [ -n "$peer_pid" ]; then
        kill "$peer_pid" 2>/dev/null || true
        wait "$peer_pid" 2>/dev/null || true
        peer_pid=""
        # The busy-poll's counts, logged at the stop (BENCH_LOG_LEVEL=info).
        if [ -n "${BENCH_LATENCY:-}" ]; then
            grep -h "busy-poll" "$work/alpha.log" "$work/beta.log" >> "$BENCH_LATENCY" 2>/dev/null || true
        fi
    fi
}

# The servers' CPU time (user + system, both daemons of a pair) in clock ticks: over a fio run,
# per write, it says what a busy-poll costs.
clk_tck=$(getconf CLK_TCK)
daemon_ticks() {
    local t=0 pid
    for pid in $server_pid $peer_pid; do
        t=$((t + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$t"
}

# name | fio arguments | metric (iops, lat_us, bw_mbs)
workloads=(
    "4k-randwrite-qd32|--rw=randwrite --bs=4k --iodepth=32|iops"
    "4k-randwrite-qd1-lat|--rw=randwrite --bs=4k --iodepth=1|lat_us"
    "1M-seqwrite-qd8|--rw=write --bs=1M --iodepth=8|bw_mbs"
    "4k-randread-qd32|--rw=randread --bs=4k --iodepth=32|iops"
    "4k-randwrite-qd32-fsync32|--rw=randwrite --bs=4k --iodepth=32 --fsync=32|iops"
)
servers=(${SERVERS:-qemu-nbd twinblk})

results=$work/results.txt
: > "$results"
# The machine may be shared: the load average before and after says how much to trust the run.
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
# CPU time the hypervisor gave to other guests (steal): on a shared host, a run with much of it
# measured the neighbours as much as the servers.
cpu_ticks() { awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8+$9, $9}' /proc/stat; }
read -r total_start steal_start < <(cpu_ticks)
for w in "${workloads[@]}"; do
    IFS='|' read -r name args metric <<<"$w"
    if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then continue; fi
    for round in $(seq 1 "$rounds"); do
        for s in "${servers[@]}"; do
            cpu_run=""
            run_load=$(cut -d' ' -f1,4 /proc/loadavg)
            common=(--runtime="$runtime" --time_based --ramp_time=2 --norandommap --randrepeat=0
                --size="$size" --output-format=json --output="$work/out.json")
            case "$s" in
                one-writer|two-writers)
                    jobs=(--name=w0 --filename="$file")
                    if [ "$s" = two-writers ]; then
                        prepare "$second"
                        jobs+=(--name=w1 --filename="$second")
                    fi
                    # shellcheck disable=SC2086
                    fio --ioengine=io_uring --direct=1 $args "${common[@]}" "${jobs[@]}" ;;
                *)
                    # SERVER@BINARY: that server run by another build (see the header).
                    twinblk=$default_twinblk
                    kind=${s%%@*}
                    [ "$kind" != "$s" ] && twinblk=${s#*@}
                    [ -x "$twinblk" ] || { echo "bench.sh: $s: $twinblk is not an executable" >&2; exit 2; }
                    start_server "$kind"
                    cpu_before=$(daemon_ticks)
                    t_before=$(date +%s.%N)
                    # shellcheck disable=SC2086
                    fio --name="$name" --ioengine=nbd --uri="$uri" $args "${common[@]}"
                    cpu_run=$(python3 -c "import sys; print((int(sys.argv[1]) - int(sys.argv[2])) / $clk_tck, float(sys.argv[4]) - float(sys.argv[3]))" \
                        "$(daemon_ticks)" "$cpu_before" "$t_before" "$(date +%s.%N)")
                    breakdown "$name" "$kind" "$round"
                    stop_server ;;
            esac
            # The value per job, averaged over the jobs (two-writers runs two).
            # "metric value" lines: the workload's metric, and for latency also its p99.
            values=$(python3 - "$work/out.json" "$metric" $cpu_run <<'PY'
import json, sys
vals, p99s, ios = [], [], 0
for job in json.load(open(sys.argv[1]))["jobs"]:
    side = "read" if job["read"]["io_bytes"] > 0 and job["write"]["io_bytes"] == 0 else "write"
    d = job[side]
    ios += d["total_ios"]
    metric = sys.argv[2]
    if metric == "iops":
        vals.append(d["iops"])
    elif metric == "bw_mbs":
        vals.append(d["bw_bytes"] / 1e6)
    else:
        vals.append(d["lat_ns"]["mean"] / 1000)
        p99s.append(d["clat_ns"]["percentile"]["99.000000"] / 1000)
v = sum(vals) / len(vals)
print(sys.argv[2], f'{v:.0f}' if sys.argv[2] == "iops" else f'{v:.1f}')
if p99s:
    print("p99_us", f'{sum(p99s) / len(p99s):.1f}')
if len(sys.argv) > 4 and ios:
    # The daemons' CPU over fio's whole run (ramp included) per write, counting the ramp's writes
    # at the measured rate: an estimate, good to compare columns.
    cpu, wall = float(sys.argv[3]), float(sys.argv[4])
    runtime = (job["job_runtime"] or 1) / 1000
    print("cpu_us", f'{cpu * 1e6 / (ios * wall / runtime):.1f}')
PY
)
            while read -r m value; do
                echo "$name $m $s $round $value" >> "$results"
                echo "  $name round $round $s: $value $m (load, runnable before: $run_load)" >&2
            done <<<"$values"
        done
    done
done

python3 - "$results" "${servers[@]}" <<'PY'
import sys, statistics
# rows[(name, metric)][server][round] = value
rows, servers = {}, sys.argv[2:]
for line in open(sys.argv[1]):
    name, metric, server, rnd, value = line.split()
    rows.setdefault((name, metric), {}).setdefault(server, {})[rnd] = float(value)
base = servers[0]
# A ratio is taken within each round, between runs minutes apart, then the median over rounds:
# the device and the host drift over a run far more than between neighbouring runs, and a ratio
# of two medians would mix rounds. The range shows how much the rounds disagreed.
# Columns as wide as their names (twinblk-sync-nolat and the like need more than 16).
wide = {s: max(16, len(s) + 2) for s in servers}
wratio = {s: max(30, len(s) + len(base) + 3) for s in servers}
head = f'{"workload":28} {"metric":7}' + "".join(f"{s:>{wide[s]}}" for s in servers)
head += "".join(f'{s + "/" + base:>{wratio[s]}}' for s in servers[1:])
print(head)
for (name, metric), by in rows.items():
    med = {s: statistics.median(by[s].values()) for s in servers if s in by}
    line = f"{name:28} {metric:7}" + "".join(f"{med.get(s, float('nan')):>{wide[s]}.1f}" for s in servers)
    for s in servers[1:]:
        ratios = []
        for rnd, v in by.get(s, {}).items():
            b = by.get(base, {}).get(rnd)
            if not b or not v:
                continue
            # For latency lower is better: base/s so that > 1 always means "s is better".
            ratios.append(b / v if metric in ("lat_us", "p99_us", "cpu_us") else v / b)
        if ratios:
            cell = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        else:
            cell = "nan"
        line += f"{cell:>{wratio[s]}}"
    print(line)
print("\nratios: median over rounds of the ratio within a round (its range in brackets); > 1.00 means")
print("better than " + base + " (latency ratios are inverted so that holds)")
PY
read -r total_end steal_end < <(cpu_ticks)
echo "load average (1/5/15 min) at start: $load_start; at end: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs)"
echo "CPU steal during the run: $(( (steal_end - steal_start) * 100 / (total_end - total_start + 1) ))% (time the host gave to other guests)"
