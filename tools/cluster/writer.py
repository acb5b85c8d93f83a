#!/usr/bin/python3
"""The cluster tests' application: a Pacemaker resource (ocf:twinblk-test:writer) colocated with
the Promoted twinblk instance, writing 4 KiB blocks to this node's NBD export and recording
every write before it is sent and every acknowledgement after it arrives, so that the test's
checker (tests/cluster.rs, with tests/ops_common/acked.rs) can prove no acknowledged write was
lost across a failover.

    writer.py STATEDIR [BLOCKS [WRITES_PER_SECOND]]     (defaults: 4096 blocks, 200/s)

Blocks have the format of tests/ops_common/acked.rs's block(): block number and version at the
head and tail, the rest a xorshift stream seeded from both, so a torn, stale or misplaced block
is recognised. Versions are unique across incarnations: they start at the start time in
microseconds times 4096 and count up (no incarnation writes 4096 blocks per microsecond).

Log: STATEDIR/writer/HOST-START.log, one line per event, unbuffered (a SIGKILL loses nothing
already written):
    S BLOCK VERSION             before the write is sent
    A NANOS HOST BLOCK VERSION  after it was acknowledged (NANOS: CLOCK_REALTIME)
    E NANOS HOST MESSAGE        an error reply or a lost connection (the write is not acknowledged)
On an error the writer reconnects every 200 ms, like an application that retries; Pacemaker's
stop (SIGTERM) ends it after the write in flight.
"""

import os
import signal
import socket
import struct
import sys
import time

import nbd

BS = 4096
MASK = (1 << 64) - 1


def block(b, version):
    x = ((b << 32) ^ version ^ 0x9E3779B97F4A7C15) & MASK
    words = []
    for _ in range(BS // 8):
        x ^= (x << 13) & MASK
        x ^= x >> 7
        x ^= (x << 17) & MASK
        words.append(x)
    words[0] = b
    words[1] = version
    words[-2] = b
    words[-1] = version
    return struct.pack("<%dQ" % (BS // 8), *words)


def main():
    statedir = sys.argv[1]
    blocks = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    # Writes per second: enough to have writes in flight at any failover, little CPU.
    rate = float(sys.argv[3]) if len(sys.argv) > 3 else 200.0
    host = socket.gethostname()
    path = os.path.join(statedir, host, "r0.nbd")
    start = time.time_ns()
    logdir = os.path.join(statedir, "writer")
    os.makedirs(logdir, exist_ok=True)
    log = open(os.path.join(logdir, "%s-%d.log" % (host, start)), "ab", buffering=0)

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))

    version = (start // 1000) * 4096
    x = version | 1
    h = None
    pace = 1.0 / rate
    next_at = time.monotonic()
    while not stopping:
        now = time.monotonic()
        if next_at > now:
            time.sleep(next_at - now)
        # After a stall (a frozen or failed write) go on at the rate, without a burst.
        next_at = max(next_at, now) + pace
        if h is None:
            try:
                h = nbd.NBD()
                h.connect_unix(path)
            except nbd.Error as e:
                log.write(b"E %d %s connect: %s\n" % (time.time_ns(), host.encode(), str(e).encode()))
                h = None
                time.sleep(0.2)
                continue
        x ^= (x << 13) & MASK
        x ^= x >> 7
        x ^= (x << 17) & MASK
        b = x % blocks
        version += 1
        log.write(b"S %d %d\n" % (b, version))
        try:
            h.pwrite(block(b, version), b * BS)
        except nbd.Error as e:
            log.write(b"E %d %s write: %s\n" % (time.time_ns(), host.encode(), str(e).encode()))
            try:
                h.shutdown()
            except nbd.Error:
                pass
            h = None
            time.sleep(0.2)
            continue
        log.write(b"A %d %s %d %d\n" % (time.time_ns(), host.encode(), b, version))
    if h is not None:
        try:
            h.shutdown()
        except nbd.Error:
            pass


if __name__ == "__main__":
    main()
