"""A watchdog that ends an embedded Ray's processes when the driver that started them dies.

A driver that starts Ray with `ray.init()` owns a local cluster of processes: Ray ties the GCS and
the raylet to the driver's life (the kernel kills them with it), but not what the raylet started:
after a SIGKILL of the driver, trial workers went on training and writing for 2-4 s, and the
dashboard and runtime-env agents were still alive 30 s later. `watch()` starts this module as a
separate process (`python -m nc_ray.reaper`), holding the write end of a pipe on its stdin.
The watchdog notes the driver's descendants every POLL_S seconds; when the pipe reports end of
file, the driver has exited (cleanly or not), and it SIGKILLs every noted process still alive.
A process is the same one only if its pid and its start time both match, so a pid the system
has since reused is never touched. It runs in its own session, so a Ctrl-C to the driver's
terminal does not end it before it has done its work.

Linux only (it reads /proc); elsewhere `watch()` does nothing and Ray's own clean-up stands.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

POLL_S = 0.25
_watchdog: subprocess.Popen | None = None


def watch() -> None:
    """Start the watchdog of this process's descendants if it has any (the processes of the Ray
    it started: a driver that joined a cluster has none), once per process; a no-op where /proc
    is missing."""
    global _watchdog
    if _watchdog is not None or not os.path.isdir("/proc/self") or not descendants(os.getpid(), processes()):
        return
    # The pipe's write end stays open in this process alone (Python's pipes are not inherited by
    # the processes Ray starts), so end of file means this process is gone.
    _watchdog = subprocess.Popen(
        [sys.executable, "-m", "nc_ray.reaper", str(os.getpid())], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks since boot) of every process, from /proc."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                text = stat.read()
        except OSError:  # it exited meanwhile
            continue
        # After the command name in parentheses (which may hold spaces): state, ppid, ..., starttime (field 22).
        fields = text[text.rindex(b")") + 2 :].split()
        found[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return found


def descendants(root: int, table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """pid -> start time of every descendant of `root` in a `processes()` table."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = {}, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found[pid] = table[pid][1]
        stack.extend(children.get(pid, []))
    return found


def _main(driver: int) -> None:
    """Note the driver's descendants until its pipe closes, then end those still alive."""
    noted: dict[int, int] = {}
    while not select.select([sys.stdin], [], [], POLL_S)[0]:
        noted.update(descendants(driver, processes()))
    while sys.stdin.buffer.read(65536):  # nothing is ever written: only end of file wakes this loop
        pass
    noted.update(descendants(driver, processes()))
    noted.pop(os.getpid(), None)
    alive = processes()
    for pid, started in noted.items():
        if pid in alive and alive[pid][1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:  # gone meanwhile, or not ours to end
                continue


if __name__ == "__main__":
    _main(int(sys.argv[1]))
