"""One pipeline run per workspace at a time.

A second run started while one holds the workspace waits for it (``HYPERBAGEL_LOCK_WAIT``
seconds, default 0 = stop at once) and otherwise stops with a message naming the holder.
The lock is an OS file lock (``fcntl.flock``), so it disappears with a crashed process.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from tasks.project import Workspace


class WorkspaceBusy(RuntimeError):
    pass


@contextmanager
def workspace_lock(ws: Workspace, wait_s: float | None = None):
    wait_s = float(os.environ.get("HYPERBAGEL_LOCK_WAIT", "0")) if wait_s is None else wait_s
    path = ws.state / "locks" / f"{ws.profile}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.time() + wait_s
    locked = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.time() >= deadline:
                    holder = Path(path).read_text().strip() or "another process"
                    raise WorkspaceBusy(
                        f"profile {ws.profile!r} is already running ({holder}); wait for it to finish, "
                        "or set HYPERBAGEL_LOCK_WAIT=SECONDS to queue behind it") from None
                time.sleep(1.0)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        yield
    finally:
        if locked:
            os.ftruncate(fd, 0)
        os.close(fd)
