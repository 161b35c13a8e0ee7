"""Child processes that never outlive the one that started them.

A daemon killed with SIGKILL (or by the OOM killer) runs no clean-up: whatever it started
must notice by itself. Two ways, one per kind of child:

* a program we exec (qemu-img, the Prefect server) asks the kernel for SIGKILL when its
  parent dies (`die_with_parent`, run in the child before exec);
* a program that starts helpers of its own (virt-v2v starts qemu-nbd, and leaves it
  running when it is killed, even by SIGTERM) runs under a shell that kills the whole
  process group when our process dies (`group_dying_with_parent`);
* a flow-run process (spawned by Prefect's runner from whatever thread, where the kernel's
  parent-death signal would follow that thread, not the daemon) watches its parent and
  exits once it is gone (`exit_with_daemon`); its own qemu-img children follow it."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from pathlib import Path

DAEMON_PID = "HYPERSDK_DAEMON_PID"  # set by hypervisord for the flow runs it starts
_PR_SET_PDEATHSIG = 1
_watching = False


def _signal_when_parent_dies(signum: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signum)


def die_with_parent() -> None:
    """Runs in a child between fork and exec: SIGKILL it when its parent dies."""
    _signal_when_parent_dies(signal.SIGKILL)


def terminate_with_parent() -> None:
    """Runs in a child between fork and exec: SIGTERM it when its parent dies."""
    _signal_when_parent_dies(signal.SIGTERM)


def group_dying_with_parent(command: list[str]) -> list[str]:
    """`command` under a shell that, told by the kernel that our process died (start it
    with `start_new_session=True, preexec_fn=terminate_with_parent`), kills its whole
    process group: the program and every helper it started. The shell exits with the
    program's status."""
    return ["/bin/sh", "-c", 'trap "kill -KILL 0" TERM; "$@" & wait $!', "sh", *command]


def exit_with_daemon(*, poll: float = 0.5) -> None:
    """In a flow-run process hypervisord started: exit as soon as hypervisord is gone
    (the next hypervisord finds the run, cleans up after it and runs it again). A no-op
    in any other process."""
    global _watching
    expected = os.environ.get(DAEMON_PID)
    if _watching or not expected or not expected.isdigit():
        return

    daemon_pid = int(expected)
    if os.getpid() == daemon_pid:  # the daemon itself (a flow run in process)
        return
    if os.getppid() != daemon_pid:
        os._exit(137)  # the daemon is already gone

    def watch() -> None:
        # nothing here may block or raise: no logging (its handlers write to the dead
        # daemon's pipes), just the check and the exit
        while True:
            time.sleep(poll)
            if os.getppid() != daemon_pid:
                os._exit(137)

    threading.Thread(target=watch, name="exit-with-daemon", daemon=True).start()
    _watching = True


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def command_line(pid: int) -> list[str]:
    """The process's argv, or [] when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2:].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return found
