#!/bin/bash
# Runs inside the test VM, chrooted into the host's root (read-only 9p; /tmp and /run are guest
# tmpfs). Argument: the run directory holding `env`. Prints one marker line per stage:
#   TWINBLK-VM-RESULT stage=NAME status=PASS|FAIL|SKIP secs=N detail...
#   TWINBLK-VM-PERF stage=NAME job=JOB iops=N bw_kib=N
set -u
RUN=$1
# shellcheck disable=SC1091
. "$RUN/env"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LOG=/tmp/guest-logs
mkdir -p "$LOG" /tmp/mnt
cd /tmp || exit 1
export RUST_LOG=${RUST_LOG:-info,twinblk_ublk=debug}

STAGE_TIMEOUT=${STAGE_TIMEOUT:-300}
# Progress goes straight to the console (fd 3), so a hang shows where it happened.
exec 3>&1
say() { echo "guest: [$(cut -d' ' -f1 /proc/uptime)s] $*" >&3; }
# Print the last lines of a log to the console so a failure explains itself.
show() { [ -f "$1" ] && sed 's/^/    | /' "$1" | tail -n "${2:-30}"; }

fs_test() { # DEV: mkfs, write files, remount, check
    local dev=$1 d=/tmp/mnt
    say "fs test on $dev"
    mkfs.ext4 -q -F "$dev" >"$LOG/mkfs" 2>&1 || { show "$LOG/mkfs"; return 1; }
    mount "$dev" $d || return 1
    head -c 3000000 /dev/urandom >$d/a || return 1
    head -c 12000000 /dev/urandom >$d/b || return 1
    mkdir -p $d/dir && echo "twinblk $(date)" >$d/dir/small || return 1
    (cd $d && sha256sum a b dir/small) >/tmp/sums || return 1
    umount $d || return 1
    # Drop the page cache so the reads really go to the device.
    echo 3 >/proc/sys/vm/drop_caches
    mount "$dev" $d || return 1
    (cd $d && sha256sum -c --quiet /tmp/sums) || { umount $d; return 1; }
    umount $d || return 1
    e2fsck -fn "$dev" >"$LOG/fsck" 2>&1 || { show "$LOG/fsck"; return 1; }
}

fio_verify() { # DEV
    say "fio verify on $1"
    fio --name=verify --filename="$1" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
        --iodepth=32 --size=64M --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --output="$LOG/fio-verify" || { show "$LOG/fio-verify"; return 1; }
    fio --name=verify-big --filename="$1" --ioengine=libaio --direct=1 --rw=write --bs=1M \
        --iodepth=4 --offset=64M --size=64M --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --output="$LOG/fio-verify-big" || { show "$LOG/fio-verify-big"; return 1; }
}

fio_perf() { # STAGE DEV
    local stage=$1 dev=$2 job line
    say "fio perf on $dev"
    for job in "randwrite4k --rw=randwrite --bs=4k --iodepth=32" "seqwrite1m --rw=write --bs=1M --iodepth=4"; do
        set -- $job
        local name=$1; shift
        line=$(fio --name="$name" --filename="$dev" --ioengine=libaio --direct=1 "$@" \
            --size=128M --time_based --runtime="$FIO_RUNTIME" --minimal) || return 1
        # Terse v3: field 48 = write bandwidth (KiB/s), 49 = write IOPS.
        echo "TWINBLK-VM-PERF stage=$stage job=$name iops=$(echo "$line" | cut -d';' -f49) bw_kib=$(echo "$line" | cut -d';' -f48)"
    done
}

wait_for() { # SECONDS COMMAND...: poll until COMMAND succeeds
    local n=$(($1 * 10)); shift
    while [ $n -gt 0 ]; do "$@" && return 0; sleep 0.1; n=$((n - 1)); done
    return 1
}

ready_dev() { sed -n 's/^READY //p' "$1" | head -n1; }

start_ublk_server() { # OUT ERR [extra args]: starts the server, sets SERVER_PID and DEV
    local out=$1 err=$2; shift 2
    : >"$out"
    case "$UBLK_SERVER" in
        example)
            "$UBLK_EXAMPLE" /tmp/ublk.img "$@" >"$out" 2>"$err" &
            SERVER_PID=$!
            wait_for 60 grep -q '^READY ' "$out" || return 1
            DEV=$(ready_dev "$out")
            ;;
        twinblk)
            if ! "$TWINBLK" serve --help 2>/dev/null | grep -q -- '--ublk'; then
                echo "twinblk serve has no --ublk option" >"$err"
                return 1
            fi
            "$TWINBLK" serve --disk /tmp/ublk.img --ublk "$@" >"$out" 2>"$err" &
            SERVER_PID=$!
            # serve prints "ublk device /dev/ublkbN" once the device is live (also on --recover,
            # where no new device node appears).
            wait_for 60 grep -q '^ublk device ' "$out" || return 1
            DEV=$(sed -n 's/^ublk device //p' "$out" | head -n1)
            ;;
        *) echo "unknown UBLK_SERVER=$UBLK_SERVER" >"$err"; return 1 ;;
    esac
    # The block device node may appear a moment after the server reports it.
    wait_for 10 test -b "$DEV"
}

stage_ublk() {
    modprobe_ok=$(test -e /dev/ublk-control && echo yes)
    [ "$modprobe_ok" = yes ] || { echo "/dev/ublk-control missing: ublk_drv not loaded"; return 1; }
    truncate -s 256M /tmp/ublk.img
    start_ublk_server "$LOG/ublk.out" "$LOG/ublk.err" || { show "$LOG/ublk.err"; echo "ublk server did not come up"; return 1; }
    say "ublk device $DEV (server pid $SERVER_PID, $UBLK_SERVER)"
    fs_test "$DEV" || { echo "filesystem test on $DEV failed"; return 1; }
    fio_verify "$DEV" || { echo "fio verify on $DEV failed"; return 1; }
    fio_perf ublk "$DEV" || { echo "fio perf on $DEV failed"; return 1; }

    say "stopping the ublk server with SIGTERM"
    stop_ublk_server "$DEV" || return 1

    # The same file, the same guest, through the kernel's NBD driver instead: the fair ublk/nbd
    # comparison (the nbd stage's numbers include the slow user-mode network to the host).
    say "nbd on the same file: twinblk serve on a unix socket + nbd-client -unix /dev/nbd1"
    "$TWINBLK" serve --disk /tmp/ublk.img --listen unix:/tmp/local-nbd.sock >"$LOG/local-nbd.out" 2>"$LOG/local-nbd.err" &
    local nbd_pid=$!
    wait_for 30 test -S /tmp/local-nbd.sock || { show "$LOG/local-nbd.err"; echo "local twinblk serve did not come up"; return 1; }
    "$NBD_CLIENT" -unix /tmp/local-nbd.sock /dev/nbd1 >"$LOG/nbd-client-local" 2>&1 ||
        { show "$LOG/nbd-client-local"; echo "nbd-client -unix failed"; return 1; }
    wait_for 10 sh -c 'test "$(cat /sys/block/nbd1/size)" -gt 0' || { echo "/dev/nbd1 has no size"; return 1; }
    fio_perf nbd-same-file /dev/nbd1 || { echo "fio perf on /dev/nbd1 failed"; return 1; }
    "$NBD_CLIENT" -d /dev/nbd1 >>"$LOG/nbd-client-local" 2>&1 || { echo "nbd-client -d /dev/nbd1 failed"; return 1; }
    kill -TERM "$nbd_pid"; wait "$nbd_pid" || { echo "local twinblk serve exited non-zero after SIGTERM"; return 1; }

    if true; then
        # Crash the server under a mounted filesystem and re-attach with --recover: the
        # filesystem must only see a pause.
        say "recovery test: kill -9 the server under a mounted filesystem"
        start_ublk_server "$LOG/ublk3.out" "$LOG/ublk3.err" || { echo "ublk server did not come up"; return 1; }
        local id=${DEV#/dev/ublkb}
        mkfs.ext4 -q -F "$DEV" && mount "$DEV" /tmp/mnt || { echo "mount before recovery failed"; return 1; }
        head -c 5000000 /dev/urandom >/tmp/mnt/before && sync
        kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null
        # A write while no server runs: it must wait for the new server, not fail.
        (head -c 2000000 /dev/urandom >/tmp/mnt/during && sync) &
        local writer=$!
        sleep 1
        start_ublk_server "$LOG/ublk2.out" "$LOG/ublk2.err" --recover "$id" ||
            { echo "recovery of $DEV failed"; return 1; }
        wait "$writer" || { echo "write during recovery failed"; return 1; }
        (cd /tmp/mnt && sha256sum before during) >/tmp/sums2
        umount /tmp/mnt && echo 3 >/proc/sys/vm/drop_caches && mount "$DEV" /tmp/mnt || { echo "remount after recovery failed"; return 1; }
        (cd /tmp/mnt && sha256sum -c --quiet /tmp/sums2) || { echo "data changed across recovery"; return 1; }
        umount /tmp/mnt
        say "recovery of $DEV with the filesystem mounted: ok"
        say "stopping the recovered ublk server with SIGTERM"
        stop_ublk_server "$DEV" || return 1
    fi

    if [ "$UBLK_SERVER" = twinblk ]; then
        # Not recovering: `twinblk ublk-del N` removes the device a killed server left.
        say "ublk-del: kill -9 the server, then delete the device it left"
        start_ublk_server "$LOG/ublk4.out" "$LOG/ublk4.err" || { echo "ublk server did not come up"; return 1; }
        local id=${DEV#/dev/ublkb}
        "$TWINBLK" ublk-del "$id" >"$LOG/ublk-del-live" 2>&1 && { echo "ublk-del deleted $DEV under its running server"; return 1; }
        grep -q "stop it with SIGTERM" "$LOG/ublk-del-live" || { show "$LOG/ublk-del-live"; echo "ublk-del of a live device: unexpected message"; return 1; }
        kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null
        test -b "$DEV" || { echo "$DEV vanished after kill -9 (expected it left for recovery)"; return 1; }
        "$TWINBLK" ublk-del "$id" >"$LOG/ublk-del" 2>&1 || { show "$LOG/ublk-del"; echo "twinblk ublk-del $id failed"; return 1; }
        wait_for 10 sh -c "! test -e $DEV" || { echo "$DEV still exists after ublk-del"; return 1; }
        test -e "/dev/ublkc$id" && { echo "/dev/ublkc$id still exists after ublk-del"; return 1; }
        say "ublk-del $id: ok"
    fi
}

# Stage repl: this guest runs the Primary (`twinblk up`, frontend = "ublk") replicating in sync
# mode over QUIC through slirp to the Secondary `twinblk up` on the host (vm-test.sh started it).
# fio with verify and a filesystem through /dev/ublkbN; the checksums of the files (after sync)
# go to the writable share $OUT; then, with writes still going on, the guest says "kill me" and
# the host kills QEMU with SIGKILL, promotes its node and checks its copy against the checksums.
stage_repl() {
    local cfg=$REPL_DIR/r0-guest.toml dev i
    local tb=("$TWINBLK")
    rm -f /tmp/ublk.img  # the ublk stage's file: guest RAM is precious
    test -e /dev/ublk-control || { echo "/dev/ublk-control missing: ublk_drv not loaded"; return 1; }
    test -w "$OUT" || { echo "$OUT (the host's share for results) is not writable"; return 1; }
    repl() { "${tb[@]}" "$1" r0 --config "$cfg" --node alpha "${@:2}"; }
    status_has() { repl status --json 2>/dev/null | grep -q "$1"; }
    repl create-md >"$LOG/repl-create-md" 2>&1 || { show "$LOG/repl-create-md"; echo "create-md failed"; return 1; }
    say "twinblk up r0 (alpha, frontend ublk) -> secondary beta at $REPL_PEER"
    repl up >"$LOG/repl-up.out" 2>"$LOG/repl-up.err" &
    REPL_PID=$!
    wait_for 60 grep -q '^ublk device ' "$LOG/repl-up.out" || { show "$LOG/repl-up.err"; echo "twinblk up made no ublk device"; return 1; }
    dev=$(sed -n 's/^ublk device //p' "$LOG/repl-up.out" | head -n1)
    wait_for 10 test -b "$dev" || { echo "$dev did not appear"; return 1; }
    repl status >"$LOG/repl-status" 2>&1
    grep -q "device: *$dev" "$LOG/repl-status" || { show "$LOG/repl-status"; echo "twinblk status does not show $dev"; return 1; }
    # The guest dials (alpha sorts first); the host, which cannot reach 10.0.2.15, accepts.
    # Until one node is Primary the connection is refused and retried, so promote first.
    repl primary --force >"$LOG/repl-primary" 2>&1 || { show "$LOG/repl-primary"; echo "primary --force failed"; return 1; }
    say "initial full sync to the host"
    wait_for 240 status_has '"peer_disk":"UpToDate"' || { show "$LOG/repl-up.err"; repl status; echo "no connection to the secondary at $REPL_PEER, or the initial sync did not finish"; return 1; }
    say "primary $dev, peer UpToDate: $(repl status --json | jq -c '{role, repl, peer_disk, ublk_device}')"

    fio --name=repl-verify --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
        --iodepth=16 --size=24M --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --output="$LOG/repl-fio" || { show "$LOG/repl-fio"; echo "fio verify on $dev failed"; return 1; }
    say "fio verify on $dev: ok"

    mkfs.ext4 -q -F "$dev" >"$LOG/repl-mkfs" 2>&1 || { show "$LOG/repl-mkfs"; echo "mkfs.ext4 on $dev failed"; return 1; }
    mount "$dev" /tmp/mnt || { echo "mount $dev failed"; return 1; }
    mkdir -p /tmp/mnt/dir/sub
    head -c 4000000 /dev/urandom >/tmp/mnt/a || return 1
    head -c 9000000 /dev/urandom >/tmp/mnt/b || return 1
    for i in $(seq 1 30); do head -c $((i * 7919)) /dev/urandom >/tmp/mnt/dir/sub/f$i || return 1; done
    echo "twinblk $(date)" >/tmp/mnt/dir/small
    sync
    # Like DRBD: neither demote nor down under a mounted filesystem.
    for cmd in secondary down; do
        repl "$cmd" >"$LOG/repl-$cmd-mounted" 2>&1 && { echo "twinblk $cmd succeeded with $dev mounted"; return 1; }
        grep -q "in use" "$LOG/repl-$cmd-mounted" || { show "$LOG/repl-$cmd-mounted"; echo "twinblk $cmd with $dev mounted: no 'in use' reason"; return 1; }
    done
    kill -0 "$REPL_PID" || { echo "the daemon exited after a refused down"; return 1; }
    status_has '"role":"Primary"' || { repl status; echo "a refused secondary changed the role"; return 1; }
    say "secondary and down refused while $dev is mounted: ok"
    # Still writing, after the sync: these are what the journal must cope with at the kill.
    fio --name=churn --directory=/tmp/mnt --rw=randwrite --bs=4k --size=4M --ioengine=psync \
        --fsync=7 --time_based --runtime=600 >/dev/null 2>&1 &
    (cd /tmp/mnt && find a b dir -type f | sort | xargs sha256sum) >"$OUT/repl-sums.tmp" || return 1
    mv "$OUT/repl-sums.tmp" "$OUT/repl-sums" && sync
    say "$(wc -l <"$OUT/repl-sums") files checksummed; asking the host to kill this VM"
    : >"$OUT/repl-ready"; sync
    echo "TWINBLK-VM-REPL-READY" >&3
    sleep 120
    echo "the host did not kill the VM"
    return 1
}

stop_ublk_server() { # DEV
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID"; local rc=$?
    [ $rc -eq 0 ] || { echo "ublk server exited with $rc after SIGTERM"; return 1; }
    wait_for 10 sh -c "! test -e $1" || { echo "$1 still exists after the server stopped"; return 1; }
}

stage_nbd() {
    say "nbd-client 10.0.2.2 $NBD_PORT /dev/nbd0"
    "$NBD_CLIENT" 10.0.2.2 "$NBD_PORT" /dev/nbd0 >"$LOG/nbd-client" 2>&1 ||
        { show "$LOG/nbd-client"; echo "nbd-client could not connect to 10.0.2.2:$NBD_PORT"; return 1; }
    wait_for 10 sh -c 'test "$(cat /sys/block/nbd0/size)" -gt 0' || { echo "/dev/nbd0 has no size"; return 1; }
    fs_test /dev/nbd0 || { echo "filesystem test on /dev/nbd0 failed"; return 1; }
    fio_verify /dev/nbd0 || { echo "fio verify on /dev/nbd0 failed"; return 1; }
    fio_perf nbd /dev/nbd0 || { echo "fio perf on /dev/nbd0 failed"; return 1; }
    "$NBD_CLIENT" -d /dev/nbd0 >>"$LOG/nbd-client" 2>&1 || { echo "nbd-client -d failed"; return 1; }
}

rc=0
for stage in $STAGES; do
    start=$(date +%s)
    case "$stage" in
        ublk | nbd | repl)
            # A watchdog: a stage that hangs (e.g. I/O stuck in the kernel) fails instead.
            ("stage_$stage" >"$LOG/stage-$stage" 2>&1) &
            pid=$!
            (sleep "$STAGE_TIMEOUT"; echo "stage timed out after ${STAGE_TIMEOUT}s" >>"$LOG/stage-$stage"; kill -9 $pid) 2>/dev/null &
            dog=$!
            wait $pid
            st=$?
            kill $dog 2>/dev/null
            detail=$(tail -n 40 "$LOG/stage-$stage")
            # Perf and progress lines go to the console as they are.
            grep -E '^TWINBLK-VM-PERF' "$LOG/stage-$stage"
            if [ "$st" -eq 0 ]; then status=PASS; else status=FAIL; rc=1; fi
            ;;
        *) status=FAIL; detail="unknown stage"; rc=1 ;;
    esac
    extra=""; [ "$status" = SKIP ] && extra=" $detail"
    echo "TWINBLK-VM-RESULT stage=$stage status=$status secs=$(($(date +%s) - start))$extra"
    if [ "$status" = FAIL ]; then
        {
            echo "$detail" | grep -v -E '^TWINBLK-VM-PERF'
            for f in "$LOG"/*.err; do [ -s "$f" ] && echo "$f:" && tail -n 15 "$f"; done
            echo "kernel:"; dmesg | tail -n 15
        } | sed 's/^/  guest-log: /'
    fi
done
exit $rc
