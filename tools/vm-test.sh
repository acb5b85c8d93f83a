#!/usr/bin/env bash
# Kernel-attached tests in a small VM (DESIGN.md "Testing layers" 6): this machine's kernel has no
# ublk or nbd driver, so boot Debian's 6.12 kernel under QEMU (TCG), share the host's root over 9p
# (read-only; the guest chroots into it) and attach twinblk through the real kernel drivers.
#
# usage: tools/vm-test.sh [all|ublk|nbd|repl]...      (default: all)
#   ublk  `twinblk serve --ublk` on a file in the guest: mkfs.ext4, mount, write, remount, check,
#         fio with verify, fio perf; the same fio perf jobs through nbd-client -unix to `twinblk
#         serve` on the same file (the fair ublk/nbd ratio); kill -9 under a mounted file system
#         and re-attach with --recover; kill -9 again and delete the device with `twinblk
#         ublk-del N`. TWINBLK_VM_UBLK_SERVER=example serves with the crate's ublk_file example.
#   nbd   `twinblk serve --listen tcp:0.0.0.0:PORT` on the HOST, nbd-client in the guest, same tests.
#   repl  replication through a real kernel: the Primary `twinblk up` (frontend = "ublk") in the
#         guest, the Secondary `twinblk up` on the HOST, sync mode, QUIC through slirp (the guest
#         dials 10.0.2.2). Initial sync, fio with verify and ext4 with files through /dev/ublkbN;
#         the checksums (after sync) go to a writable 9p share; then, with writes still going on,
#         the host kills QEMU (SIGKILL), promotes its node (`twinblk primary`), copies its NBD
#         export (nbdcopy) and checks it: the journal replays, `e2fsck -fn` is clean and every
#         checksummed file reads back (debugfs) with its checksum. Always runs last.
#
# Environment:
#   TWINBLK_VM_CACHE        downloads and build products   (default ~/.cache/twinblk-vm)
#   TWINBLK_VM_NBD_SERVER   twinblk | qemu-nbd             (default twinblk)
#   TWINBLK_VM_UBLK_SERVER  twinblk | example              (default twinblk)
#   TWINBLK_VM_PROFILE      cargo profile for the binaries (default release)
#   TWINBLK_VM_TIMEOUT      seconds for the whole VM run   (default 600)
#   TWINBLK_VM_FIO_RUNTIME  seconds per fio perf job       (default 10)
#   TWINBLK_VM_KERNEL       kernel package to use          (default newest linux-image-6.12.*-amd64-unsigned)
#   TWINBLK_VM_VERBOSE=1    show the serial console live
# Exits non-zero, saying what failed, on any failure, including missing qemu or kernel packages.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${TWINBLK_VM_CACHE:-$HOME/.cache/twinblk-vm}
NBD_SERVER=${TWINBLK_VM_NBD_SERVER:-twinblk}
UBLK_SERVER=${TWINBLK_VM_UBLK_SERVER:-twinblk}
PROFILE=${TWINBLK_VM_PROFILE:-release}
TIMEOUT=${TWINBLK_VM_TIMEOUT:-600}
FIO_RUNTIME=${TWINBLK_VM_FIO_RUNTIME:-10}
VERBOSE=${TWINBLK_VM_VERBOSE:-0}

die() { echo "vm-test: FAIL: $*" >&2; exit 1; }
note() { echo "vm-test: $*" >&2; }

STAGES=""
for a in "${@:-all}"; do
    case "$a" in
        all) STAGES="ublk nbd repl" ;;
        ublk | nbd | repl) STAGES="$STAGES $a" ;;
        -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown stage '$a' (stages: all ublk nbd repl)" ;;
    esac
done
STAGES=$(echo $STAGES)
# repl ends with the VM killed: it must be the last stage.
if [[ " $STAGES " == *" repl "* ]]; then STAGES=$(echo ${STAGES//repl/} repl); fi
case "$NBD_SERVER" in twinblk | qemu-nbd) ;; *) die "TWINBLK_VM_NBD_SERVER must be twinblk or qemu-nbd" ;; esac
case "$UBLK_SERVER" in twinblk | example) ;; *) die "TWINBLK_VM_UBLK_SERVER must be twinblk or example" ;; esac

# --- tools on the host -------------------------------------------------------------------------
command -v qemu-system-x86_64 >/dev/null ||
    die "qemu-system-x86_64 not found: apt-get install -t bookworm-backports qemu-system-x86 (add bookworm-backports to the apt sources first)"
for t in apt-get apt-cache dpkg xz timeout; do command -v $t >/dev/null || die "$t not found"; done
for t in fio mkfs.ext4 e2fsck sha256sum debugfs nbdcopy jq; do
    command -v $t >/dev/null || die "$t not found on the host (the guest runs the host's binaries): install it"
done

# --- Debian packages, downloaded once -----------------------------------------------------------
mkdir -p "$CACHE/debs" "$CACHE/x"
fetch() { # PACKAGE: download into the cache unless present; prints the .deb path
    local pkg=$1 deb
    deb=$(ls "$CACHE/debs/${pkg}_"*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        (cd "$CACHE/debs" && apt-get download "$pkg" >/dev/null 2>"$CACHE/debs/$pkg.err") ||
            die "apt-get download $pkg failed: $(cat "$CACHE/debs/$pkg.err")"
        deb=$(ls "$CACHE/debs/${pkg}_"*.deb | head -n1)
    fi
    echo "$deb"
}
extract() { # PACKAGE DIR
    [ -d "$2" ] || { mkdir -p "$2.tmp" && dpkg -x "$(fetch "$1")" "$2.tmp" && mv "$2.tmp" "$2"; }
}

KPKG=${TWINBLK_VM_KERNEL:-}
if [ -z "$KPKG" ]; then
    KPKG=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64-unsigned$' 2>/dev/null |
        awk '{print $1}' | sort -V | tail -n1)
    [ -n "$KPKG" ] || KPKG=$(ls "$CACHE/debs" 2>/dev/null | sed -n 's/^\(linux-image-6\.12\.[0-9]*+deb[0-9]*-amd64-unsigned\)_.*/\1/p' | sort -V | tail -n1)
    [ -n "$KPKG" ] || die "no linux-image-6.12.*-amd64-unsigned package: add bookworm-backports (or bookworm-security) to the apt sources and apt-get update; bookworm's 6.1 kernel has no ublk"
fi
KDIR="$CACHE/x/$KPKG"
extract "$KPKG" "$KDIR"
KVER=$(ls "$KDIR/lib/modules" | head -n1)
VMLINUZ="$KDIR/boot/vmlinuz-$KVER"
[ -f "$VMLINUZ" ] || die "$KPKG holds no kernel image"
extract busybox-static "$CACHE/x/busybox-static"
BUSYBOX="$CACHE/x/busybox-static/bin/busybox"
[ -x "$BUSYBOX" ] || die "busybox-static holds no bin/busybox"

NBD_CLIENT=""
if [[ " $STAGES " == *" nbd "* || " $STAGES " == *" ublk "* ]]; then  # ublk compares with nbd on the same file
    extract nbd-client "$CACHE/x/nbd-client"
    extract libnl-genl-3-200 "$CACHE/x/libnl-genl"
    NBD_LIBS="$CACHE/x/libnl-genl/lib/x86_64-linux-gnu:$CACHE/x/libnl-genl/usr/lib/x86_64-linux-gnu"
    if LD_LIBRARY_PATH="$NBD_LIBS" ldd "$CACHE/x/nbd-client/sbin/nbd-client" | grep -q 'not found'; then
        die "nbd-client misses libraries: $(LD_LIBRARY_PATH="$NBD_LIBS" ldd "$CACHE/x/nbd-client/sbin/nbd-client" | grep 'not found')"
    fi
    # A wrapper, so the guest finds the extracted libraries.
    mkdir -p "$CACHE/bin"
    cat >"$CACHE/bin/nbd-client" <<WRAP
#!/bin/sh
LD_LIBRARY_PATH="$NBD_LIBS" exec "$CACHE/x/nbd-client/sbin/nbd-client" "\$@"
WRAP
    chmod +x "$CACHE/bin/nbd-client"
    NBD_CLIENT="$CACHE/bin/nbd-client"
fi

# --- initramfs: busybox, the modules the tests need, our init ------------------------------------
MODDIR="$KDIR/lib/modules/$KVER"
WANT="ublk_drv nbd ext4 crc32c_generic crc32c_intel 9pnet_virtio 9p virtio_net"
IRD="$CACHE/initramfs.d"
rm -rf "$IRD" && mkdir -p "$IRD"/{bin,proc,sys,dev,tmp,lib/modules}
cp "$BUSYBOX" "$IRD/bin/busybox"
cp "$ROOT/tools/vm/init" "$IRD/init" && chmod +x "$IRD/init"
# The package ships no modules.dep (depmod makes it at install time, and kmod may not be
# installed here): read each module's dependencies from its .modinfo "depends=" string.
declare -A MODPATH=() SEEN=()
while IFS= read -r f; do
    n=$(basename "$f"); n=${n%%.ko*}; MODPATH[${n//-/_}]=$f
done < <(find "$MODDIR/kernel" -name '*.ko*')
: >"$IRD/modules.order"
add_mod() { # NAME: unpack it into the initramfs, dependencies first
    local n=${1//-/_} f out d
    [ -n "${SEEN[$n]:-}" ] && return 0
    SEEN[$n]=1
    f=${MODPATH[$n]:-}
    if [ -z "$f" ]; then
        grep -q "/${n//_/[-_]}.ko" "$MODDIR/modules.builtin" || die "module $n is neither a module nor built into $KVER"
        return 0
    fi
    out="$IRD/lib/modules/$n.ko"
    case "$f" in
        *.xz) xz -dc "$f" >"$out" ;;
        *.zst) zstd -qdc "$f" >"$out" ;;
        *) cp "$f" "$out" ;;
    esac
    for d in $(tr '\0' '\n' <"$out" | sed -n 's/^depends=//p' | tr ',' ' '); do add_mod "$d"; done
    echo "$n.ko" >>"$IRD/modules.order"
}
for m in $WANT; do add_mod "$m"; done
INITRD="$CACHE/initramfs.gz"
(cd "$IRD" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1 >"$INITRD") || die "building the initramfs failed"

# --- binaries -----------------------------------------------------------------------------------
PFLAG=(--profile "$PROFILE")
OUTDIR="$ROOT/target/$PROFILE"; [ "$PROFILE" = dev ] && OUTDIR="$ROOT/target/debug"
TWINBLK="$OUTDIR/twinblk"
UBLK_EXAMPLE="$OUTDIR/examples/ublk_file"
note "building binaries ($PROFILE)"
(cd "$ROOT" && cargo build -q "${PFLAG[@]}" --bin twinblk) || die "cargo build of twinblk failed"
if [[ " $STAGES " == *" ublk "* && "$UBLK_SERVER" == example ]]; then
    (cd "$ROOT" && cargo build -q "${PFLAG[@]}" -p twinblk-ublk --example ublk_file) || die "cargo build of the ublk_file example failed"
fi

# --- the run ------------------------------------------------------------------------------------
RUN=$(mktemp -d "$CACHE/run.XXXXXX")
chmod 755 "$RUN"
CONSOLE="$RUN/console.log"
SERVER_PID="" SECONDARY_PID="" QPID=""
cleanup() {
    [ -n "$QPID" ] && kill -9 "$QPID" 2>/dev/null
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    [ -n "$SECONDARY_PID" ] && kill "$SECONDARY_PID" 2>/dev/null && wait "$SECONDARY_PID" 2>/dev/null
    return 0
}
trap cleanup EXIT

NBD_PORT=""
if [[ " $STAGES " == *" nbd "* ]]; then
    NBD_PORT=${TWINBLK_VM_NBD_PORT:-$((20000 + RANDOM % 20000))}
    IMG="$RUN/nbd.img"
    truncate -s 256M "$IMG"
    case "$NBD_SERVER" in
        twinblk) "$TWINBLK" serve --disk "$IMG" --listen "tcp:0.0.0.0:$NBD_PORT" >"$RUN/server.log" 2>&1 & ;;
        qemu-nbd) qemu-nbd -f raw -t --cache=none --aio=native -b 0.0.0.0 -p "$NBD_PORT" "$IMG" >"$RUN/server.log" 2>&1 & ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 100); do
        (exec 3<>/dev/tcp/127.0.0.1/"$NBD_PORT") 2>/dev/null && break
        kill -0 "$SERVER_PID" 2>/dev/null || die "$NBD_SERVER exited at start: $(tail -n 20 "$RUN/server.log")"
        sleep 0.1
    done
    (exec 3<>/dev/tcp/127.0.0.1/"$NBD_PORT") 2>/dev/null || die "$NBD_SERVER does not listen on port $NBD_PORT"
    note "host NBD server: $NBD_SERVER on port $NBD_PORT"
fi

# --- repl: the Secondary on the host ------------------------------------------------------------
# Two resource files that differ only in beta's address: the guest dials 10.0.2.2 (slirp's
# alias for the host's loopback), the host binds 127.0.0.1. alpha's address is the guest's
# own; the host never dials it (alpha sorts first, so alpha dials).
REPL_DIR="" REPL_PEER="" OUT=""
if [[ " $STAGES " == *" repl "* ]]; then
    REPL_DIR="$RUN/repl" OUT="$RUN/out"
    mkdir -p "$REPL_DIR" "$OUT"
    for n in alpha beta; do
        "$TWINBLK" keygen --name $n --out "$REPL_DIR" >/dev/null 2>"$REPL_DIR/keygen.err" ||
            die "twinblk keygen $n failed: $(cat "$REPL_DIR/keygen.err")"
    done
    REPL_PORT=${TWINBLK_VM_REPL_PORT:-$((20000 + RANDOM % 20000))}
    REPL_PEER="10.0.2.2:$REPL_PORT"
    repl_conf() { # BETA_ADDRESS
        cat <<CONF
[resource]
name = "r0"
protocol = "sync"
timeout = "3s"
connect-retry = "1s"

[node.alpha]
address  = "10.0.2.15:7789"
disk     = "/tmp/alpha.img"
size     = "64M"
nbd      = "unix:/run/r0-alpha.nbd"
admin    = "/run/r0-alpha.sock"
cert     = "$REPL_DIR/alpha.crt"
key      = "$REPL_DIR/alpha.key"
frontend = "ublk"

[node.beta]
address  = "$1"
disk     = "$REPL_DIR/beta.img"
size     = "64M"
nbd      = "unix:$REPL_DIR/beta.nbd"
admin    = "$REPL_DIR/beta.sock"
cert     = "$REPL_DIR/beta.crt"
key      = "$REPL_DIR/beta.key"
CONF
    }
    repl_conf "$REPL_PEER" >"$REPL_DIR/r0-guest.toml"
    repl_conf "127.0.0.1:$REPL_PORT" >"$REPL_DIR/r0-host.toml"
    beta() { "$TWINBLK" "$1" r0 --config "$REPL_DIR/r0-host.toml" --node beta "${@:2}"; }
    beta create-md >/dev/null 2>"$REPL_DIR/create-md.err" || die "twinblk create-md (host, beta) failed: $(cat "$REPL_DIR/create-md.err")"
    beta up >"$REPL_DIR/beta.out" 2>"$REPL_DIR/beta.log" &
    SECONDARY_PID=$!
    for _ in $(seq 100); do
        grep -qs '^listening on ' "$REPL_DIR/beta.out" && break
        kill -0 "$SECONDARY_PID" 2>/dev/null || die "the host's secondary exited at start: $(tail -n 20 "$REPL_DIR/beta.log")"
        sleep 0.1
    done
    grep -qs '^listening on ' "$REPL_DIR/beta.out" || die "the host's secondary did not come up: $(tail -n 20 "$REPL_DIR/beta.log")"
    note "host secondary: twinblk up r0 --node beta, QUIC on UDP 127.0.0.1:$REPL_PORT (guest dials $REPL_PEER)"
fi

# The guest sees the host's / but has its own tmpfs /tmp and /run: a checkout under /tmp (as CI's
# may be) would be invisible there, so the guest runs copies kept in the run directory.
mkdir -p "$RUN/bin"
cp "$TWINBLK" "$RUN/bin/twinblk"
GUEST_TWINBLK="$RUN/bin/twinblk" GUEST_UBLK_EXAMPLE=""
if [ -x "$UBLK_EXAMPLE" ]; then cp "$UBLK_EXAMPLE" "$RUN/bin/ublk_file"; GUEST_UBLK_EXAMPLE="$RUN/bin/ublk_file"; fi

cat >"$RUN/env" <<ENV
STAGES="$STAGES"
UBLK_SERVER=$UBLK_SERVER
TWINBLK="$GUEST_TWINBLK"
UBLK_EXAMPLE="$GUEST_UBLK_EXAMPLE"
NBD_CLIENT="$NBD_CLIENT"
NBD_PORT=$NBD_PORT
FIO_RUNTIME=$FIO_RUNTIME
REPL_DIR="$REPL_DIR"
REPL_PEER="$REPL_PEER"
OUT="$OUT"
ENV
cp "$ROOT/tools/vm/guest-test.sh" "$RUN/guest-test.sh"

note "booting $KVER (TCG), stages: $STAGES; console: $CONSOLE"
T0=$(date +%s)
QEMU=(qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 1024 -nographic -no-reboot
    -kernel "$VMLINUZ" -initrd "$INITRD"
    -append "console=ttyS0 quiet loglevel=4 panic=-1 tb_run=$RUN"
    -virtfs "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap"
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0)
[ -n "$OUT" ] && QEMU+=(-virtfs "local,path=$OUT,mount_tag=out,security_model=none")
# QEMU runs in the background: the repl stage ends with the host killing it (SIGKILL) once the
# guest says it is ready; a run past TIMEOUT is killed the same way and fails.
"${QEMU[@]}" </dev/null >"$CONSOLE" 2>&1 &
QPID=$!
TAIL_PID=""
[ "$VERBOSE" = 1 ] && { tail -n +1 -f --pid="$QPID" "$CONSOLE" & TAIL_PID=$!; }
KILLED="" TIMED_OUT=""
# (stderr off: bash would report the killed job as a "Killed" line)
{
    while kill -0 "$QPID"; do
        if [ -n "$OUT" ] && [ -z "$KILLED" ] && [ -f "$OUT/repl-ready" ]; then
            kill -9 "$QPID"; KILLED=1
        elif [ $(($(date +%s) - T0)) -ge "$TIMEOUT" ]; then
            kill -9 "$QPID"; TIMED_OUT=1
        fi
        sleep 0.2
    done
    set +e
    wait "$QPID"; QRC=$?
    set -e
} 2>/dev/null
[ -n "$KILLED" ] && note "the guest was ready: killed QEMU (SIGKILL) under a mounted, busy ext4 on /dev/ublkb*"
QPID=""
[ -n "$TAIL_PID" ] && wait "$TAIL_PID" 2>/dev/null
T1=$(date +%s)
tr -d '\r' <"$CONSOLE" >"$CONSOLE.txt"

# --- repl: the host's copy after the guest was killed --------------------------------------------
# Prints the problem and returns 1 on the first failure.
check_repl() {
    local st i img="$REPL_DIR/copy.img" files="$REPL_DIR/files"
    [ -s "$OUT/repl-sums" ] || { echo "the guest recorded no checksums"; return 1; }
    kill -0 "$SECONDARY_PID" 2>/dev/null || { echo "the host's secondary died: $(tail -n 5 "$REPL_DIR/beta.log")"; return 1; }
    # The secondary notices the lost peer after `timeout`; until then the peer is still Primary.
    for i in $(seq 60); do
        st=$(beta status --json 2>/dev/null) || st=""
        [ "$(echo "$st" | jq -r .connected 2>/dev/null)" = false ] && break
        sleep 0.5
    done
    [ "$(echo "$st" | jq -r .connected)" = false ] || { echo "the secondary still thinks it is connected 30 s after the kill"; return 1; }
    echo "host after the kill: $(echo "$st" | jq -c '{role, disk, repl, out_of_sync_bytes}')"
    [ "$(echo "$st" | jq -r .disk)" = UpToDate ] || { echo "the host's disk is $(echo "$st" | jq -r .disk), not UpToDate"; return 1; }
    beta primary >"$REPL_DIR/primary.out" 2>&1 || { echo "twinblk primary on the host failed: $(cat "$REPL_DIR/primary.out")"; return 1; }
    nbdcopy "nbd+unix:///r0?socket=$REPL_DIR/beta.nbd" "$img" 2>"$REPL_DIR/nbdcopy.err" ||
        { echo "nbdcopy of the host's export failed: $(cat "$REPL_DIR/nbdcopy.err")"; return 1; }
    # The guest died with the file system mounted and busy: replay the journal; then preen (-p),
    # which fixes only what an unclean shutdown leaves (the superblock's free counts, which ext4
    # does not keep current) and stops with 4 on anything else; then it must check clean.
    e2fsck -E journal_only -y "$img" >"$REPL_DIR/e2fsck-journal" 2>&1
    [ $? -le 1 ] || { echo "e2fsck could not replay the journal: $(tail -n 5 "$REPL_DIR/e2fsck-journal")"; return 1; }
    e2fsck -fp "$img" >"$REPL_DIR/e2fsck-preen" 2>&1
    [ $? -le 1 ] || { echo "e2fsck -fp found more than an unclean shutdown leaves: $(tail -n 15 "$REPL_DIR/e2fsck-preen")"; return 1; }
    e2fsck -fn "$img" >"$REPL_DIR/e2fsck" 2>&1 || { echo "e2fsck -fn of the host's copy found errors: $(tail -n 15 "$REPL_DIR/e2fsck")"; return 1; }
    mkdir -p "$files"
    local sum path
    while read -r sum path; do
        mkdir -p "$files/$(dirname "$path")"
        debugfs -R "dump /$path $files/$path" "$img" >/dev/null 2>>"$REPL_DIR/debugfs.err"
        [ -f "$files/$path" ] || { echo "$path is missing on the host's copy"; return 1; }
    done <"$OUT/repl-sums"
    (cd "$files" && sha256sum -c --quiet "$OUT/repl-sums") >"$REPL_DIR/sums.out" 2>&1 ||
        { echo "files differ on the host's copy: $(grep -v ': OK$' "$REPL_DIR/sums.out" | head -n 5)"; return 1; }
    echo "host's copy: journal replayed, e2fsck clean, $(wc -l <"$OUT/repl-sums") files match their checksums"
    beta down >/dev/null 2>&1 || { echo "twinblk down on the host failed"; return 1; }
}

# --- verdict ------------------------------------------------------------------------------------
FAILED=""
[ -n "$TIMED_OUT" ] && FAILED="$FAILED timeout(${TIMEOUT}s)"
grep -q 'TWINBLK-VM-BOOTED' "$CONSOLE.txt" || FAILED="$FAILED boot"
echo "vm-test: VM ran $((T1 - T0)) s (qemu exit $QRC)"
grep -E '^(TWINBLK-VM-(RESULT|PERF)|guest:|  guest-log:|init:)' "$CONSOLE.txt" | sed 's/^/  /' || true
REPL_DETAIL=""
if [[ " $STAGES " == *" repl "* ]]; then
    if [ -n "$KILLED" ] && ! grep -q "^TWINBLK-VM-RESULT stage=repl " "$CONSOLE.txt"; then
        T2=$(date +%s)
        if REPL_DETAIL=$(check_repl 2>&1); then st=PASS; else st=FAIL; fi
        if [ $st = PASS ]; then
            # check_repl ended with `twinblk down`: the node must exit cleanly.
            if ! wait "$SECONDARY_PID"; then st=FAIL; REPL_DETAIL="$REPL_DETAIL
the host's node exited non-zero after twinblk down"; fi
            SECONDARY_PID=""
        fi
        line="TWINBLK-VM-RESULT stage=repl status=$st secs=$(($(date +%s) - T2)) (host check)"
        echo "$line" >>"$CONSOLE.txt"
        echo "$REPL_DETAIL" | sed 's/^/  host: /'
        echo "  $line"
        # The guest was killed on purpose: no exit marker.
        echo "TWINBLK-VM-EXIT rc=killed" >>"$CONSOLE.txt"
    elif [ -z "$KILLED" ]; then
        note "the guest never said it was ready to be killed (see the repl result above)"
    fi
fi
for s in $STAGES; do
    line=$(grep -m1 "^TWINBLK-VM-RESULT stage=$s " "$CONSOLE.txt" || true)
    case "$line" in
        *status=PASS*) ;;
        *status=SKIP*) note "stage $s skipped: ${line#*status=SKIP }" ;;
        *status=FAIL*) FAILED="$FAILED $s" ;;
        *) FAILED="$FAILED $s(no-result)" ;;
    esac
done
grep -q '^TWINBLK-VM-RESULT stage=boot status=FAIL' "$CONSOLE.txt" && FAILED="$FAILED boot"
grep -q '^TWINBLK-VM-EXIT' "$CONSOLE.txt" || FAILED="$FAILED no-exit-marker"
if [ -n "$NBD_PORT" ] && [ -n "$SERVER_PID" ] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
    FAILED="$FAILED nbd-server-died"
fi
if [ -n "$FAILED" ]; then
    note "console tail:"
    tail -n 40 "$CONSOLE.txt" | sed 's/^/    /' >&2
    [ -f "$RUN/server.log" ] && { note "host server log tail:"; tail -n 20 "$RUN/server.log" | sed 's/^/    /' >&2; }
    [ -n "$REPL_DIR" ] && [ -f "$REPL_DIR/beta.log" ] && { note "host secondary log tail:"; tail -n 20 "$REPL_DIR/beta.log" | sed 's/^/    /' >&2; }
    die "failed:$FAILED (full console: $CONSOLE.txt)"
fi
echo "vm-test: PASS ($STAGES)"
