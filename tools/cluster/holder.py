#!/usr/bin/python3
"""A tools/cluster node's first process ("holder"), exec'd by `cluster _holder NODE` once the
node's mounts are in place: it keeps the node's mount and UTS namespaces alive, starts the node's
daemons (corosync, pacemakerd, ...) as its own children when a shell command line is written to
NODEDIR/spawn, and, as a child subreaper, reaps every process of the node that is orphaned (the
daemons the OCF agents start with setsid, pacemakerd's children when it dies), so a killed node
leaves no zombies behind. SIGTERM is ignored: the node is powered off by SIGKILL to all its
processes, the holder last (tools/cluster/cluster kill, fence_netns).

    holder.py NODEDIR
"""

import ctypes
import os
import select
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}


def main():
    nodedir = sys.argv[1]
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("holder: prctl(PR_SET_CHILD_SUBREAPER): errno %d" % ctypes.get_errno())
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Opened read-write so that the FIFO never reports end-of-file between writers.
    fd = os.open(os.path.join(nodedir, "spawn"), os.O_RDWR)
    with open(os.path.join(nodedir, "holder.pid"), "w") as f:
        f.write("%d\n" % os.getpid())
    buf = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            buf += os.read(fd, 65536)
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    os.posix_spawn("/bin/sh", ["sh", "-c", line.decode()], ENV, setsid=True)
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break


if __name__ == "__main__":
    main()
