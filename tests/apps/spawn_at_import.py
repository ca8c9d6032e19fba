"""The sample app, which at import starts a thread and a process and writes what they
inherited to $SPAWN_REPORT_DIR/<pid>.json: the supervisor's environment variables, the
signal mask (SigBlk) of the thread and of the process, and the process's open fds."""

import json
import os
import subprocess
import sys
import threading

from tests.apps.sample import registry

_PROBE = """
import json, os, sys
blocked = [l.split()[1] for l in open("/proc/self/status") if l.startswith("SigBlk")][0]
print(json.dumps({
    "env": sorted(k for k in os.environ if k in
                  ("PGQUEUE_SUPERVISED", "PGQUEUE_SUPERVISOR_PID", "PGQUEUE_READY_FD")),
    "sigblk": blocked,
    "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
}))
"""


def _thread_mask(found: dict[str, str]) -> None:
    tid = threading.get_native_id()
    with open(f"/proc/self/task/{tid}/status") as status:
        found["sigblk"] = next(line.split()[1] for line in status if line.startswith("SigBlk"))


_thread: dict[str, str] = {}
_t = threading.Thread(target=_thread_mask, args=(_thread,))
_t.start()
_t.join()
_child = subprocess.run(
    [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, close_fds=False
)
with open(os.path.join(os.environ["SPAWN_REPORT_DIR"], f"{os.getpid()}.json"), "w") as out:
    json.dump({"thread": _thread, "process": json.loads(_child.stdout)}, out)

__all__ = ["registry"]
