"""Run a command with a dead network filesystem mounted at a folder: ``python dead_mount.py [--gone] DIR -- CMD ...``.

A hard-mounted NFS share whose server is gone blocks ``stat`` and ``getdents`` in the kernel until the server is
back. A FUSE filesystem whose server never answers does the same: this process opens ``/dev/fuse``, mounts it at
``DIR`` and never reads a request, so every system call that reaches into ``DIR`` (its ``stat``, a listing)
waits in the kernel. ``CMD`` runs in this mount namespace, with its output and exit code passed through; then
this process closes ``/dev/fuse`` (the kernel aborts the connection and every waiting call fails with
``ENOTCONN``) and unmounts ``DIR``, whose own files show again (the share is back).

With ``--gone`` the connection is aborted before ``CMD`` starts: every system call under ``DIR`` fails at once
with ``ENOTCONN`` ("Transport endpoint is not connected"), as on an sshfs, s3fs or gcsfuse mount whose daemon
died.

Run it in a private mount namespace (``unshare --mount --propagation private``, or with ``--user
--map-root-user`` where only user namespaces are allowed) so that nothing outside sees the mount. Exits 125 when
the mount cannot be made (no ``/dev/fuse``, no permission).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

MNT_DETACH = 2


def main(argv: list[str]) -> int:
    gone = argv[:1] == ["--gone"]
    argv = argv[1:] if gone else argv
    if len(argv) < 3 or argv[1] != "--":
        print("usage: dead_mount.py [--gone] DIR -- CMD ...", file=sys.stderr)
        return 125
    target, cmd = argv[0], argv[2:]
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)  # close-on-exec: CMD never holds the connection
    except OSError as e:
        print(f"dead_mount: cannot open /dev/fuse: {e}", file=sys.stderr)
        return 125
    st = os.stat(target)
    opts = f"fd={fd},rootmode=40000,user_id={st.st_uid},group_id={st.st_gid}".encode()
    if libc.mount(b"dead-server", target.encode(), b"fuse", 0, opts) != 0:
        err = ctypes.get_errno()
        print(f"dead_mount: mount -t fuse {target}: {os.strerror(err)}", file=sys.stderr)
        return 125
    try:
        if gone:
            os.close(fd)
            fd = -1
        return subprocess.run(cmd).returncode
    finally:
        if fd >= 0:
            os.close(fd)  # the server is gone for good: the kernel aborts the connection, waiting calls return
        libc.umount2(target.encode(), MNT_DETACH)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
