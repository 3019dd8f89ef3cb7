"""CPU and memory of a process tree, read from /proc (Linux only)."""

from __future__ import annotations

import os
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may contain spaces)."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Direct children of pid."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        text = _read(f"/proc/{pid}/task/{task}/children")
        if text:
            found.extend(int(p) for p in text.split())
    return found


def tree(pid: int) -> list[int]:
    """pid and all of its live descendants (worker processes)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        if os.path.exists(f"/proc/{p}"):
            out.append(p)
            todo.extend(children(p))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0 if it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # after "pid (comm) ": state=0 ppid=1 ... utime=11 stime=12
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _status_kib(pid: int, key: str) -> int:
    text = _read(f"/proc/{pid}/status")
    if text is None:
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rss_bytes(pids: list[int]) -> int:
    """Current resident set size (VmRSS) summed over the processes."""
    return sum(_status_kib(p, "VmRSS") for p in pids) * 1024


def peak_rss_bytes(pids: list[int]) -> int:
    """Peak resident set size (VmHWM) summed over the processes (an upper bound for a tree)."""
    return sum(_status_kib(p, "VmHWM") for p in pids) * 1024


def reset_peak_rss(pids: list[int]) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, needs ptrace rights); False if refused."""
    ok = True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


@dataclass
class CpuSample:
    """Per-process CPU seconds of a tree, taken before a measured run."""

    root: int
    per_pid: dict[int, float]

    @classmethod
    def take(cls, root: int) -> CpuSample:
        return cls(root, {p: cpu_seconds(p) for p in tree(root)})

    def delta(self) -> float:
        """CPU seconds the tree spent since the sample (workers that exited meanwhile are lost)."""
        return sum(max(0.0, cpu_seconds(p) - self.per_pid.get(p, 0.0)) for p in tree(self.root))
