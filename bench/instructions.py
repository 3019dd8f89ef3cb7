"""User-space instructions (or, with --syscalls, system calls) per transaction of pgdoorman (one worker).

TPS and CPU time vary by ±10 % between runs on a small shared machine; instruction counts do not,
so they show a change of 1 % in the pooler's own cost. Each source tree runs under callgrind; the
counters are zeroed after a warm-up and dumped after N pgbench -S transactions of one client.

    python -m bench.instructions --roots .,/tmp/base --tx 1000

(make /tmp/base with `git worktree add /tmp/base <commit>` and build its scanner there:
`python setup.py build_ext --inplace`). Kernel time (the reads and writes) is not counted: it is
the same for any relay that does one write per read, and `--syscalls` checks that it is: the pooler
runs under strace instead and the calls made during the N transactions are counted by name.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable

from bench.cluster import DATABASE, USER, start_cluster
from bench.doorman import PgDoorman
from bench.records import MODES
from pgdoorman.devcluster import free_port


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    p.add_argument("--roots", default=".", help="comma-separated source trees to compare")
    p.add_argument("--modes", default=",".join(MODES), help="pgbench -M modes")
    p.add_argument("--tx", type=int, default=1000, help="transactions counted per mode")
    p.add_argument("--keep", action="store_true", help="keep the callgrind files (for callgrind_annotate)")
    p.add_argument("--syscalls", action="store_true", help="count system calls under strace instead")
    args = p.parse_args(argv)
    if args.syscalls:
        if shutil.which("strace") is None:
            p.error("needs strace (apt-get install strace)")
    elif shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        p.error("needs valgrind (apt-get install valgrind)")
    roots = [os.path.abspath(r) for r in args.roots.split(",")]
    outdir = tempfile.mkdtemp(prefix="pgdoorman-callgrind-")
    cluster = start_cluster(1, 100)
    targets: list[PgDoorman] = []
    try:
        for i, root in enumerate(roots):
            t = PgDoorman(f"pgdoorman{i}", cluster.host, free_port(cluster.host), server_port=cluster.port,
                          database=DATABASE, user=USER, pool_size=4, workers=1, source_root=root,
                          log_level="warning")
            t.prepare()
            command = t.command()
            out = os.path.join(outdir, f"cg-{i}")
            wrapper = (["strace", "-f", "-qq", "-o", out] if args.syscalls else
                       ["valgrind", "--tool=callgrind", "--cache-sim=no", f"--callgrind-out-file={out}.%p"])
            t.command = functools.partial(list, [*wrapper, *command])  # type: ignore[method-assign]
            t.start()
            targets.append(t)

        def pgbench(t: PgDoorman, mode: str, n: int) -> None:
            subprocess.run([cluster.tool("pgbench"), "-n", "-S", "-M", mode, "-c", "1", "-t", str(n),
                            "-h", cluster.host, "-p", str(t.port), "-U", USER, DATABASE],
                           capture_output=True, text=True, check=True)

        if args.syscalls:
            count_syscalls(targets, roots, args.modes.split(","), args.tx, outdir, pgbench)
            return 0
        print(f"user-space instructions per pgbench -S transaction ({args.tx} transactions, 1 client)")
        for mode in args.modes.split(","):
            counts = []
            for i, t in enumerate(targets):
                pgbench(t, mode, 100)
                subprocess.run(["callgrind_control", "-z", str(t.pid())], capture_output=True, check=True)
                pgbench(t, mode, args.tx)
                subprocess.run(["callgrind_control", "-d", mode, str(t.pid())], capture_output=True,
                               check=True)
                dump = max(glob.glob(os.path.join(outdir, f"cg-{i}.*")), key=os.path.getmtime)
                with open(dump) as f:
                    found = re.search(r"^(?:summary|totals): (\d+)", f.read(), re.M)
                counts.append(int(found.group(1)) / args.tx if found else float("nan"))
            cells = [f"{root}: {n:,.0f}" + (f" ({n / counts[0] - 1:+.1%})" if j else "")
                     for j, (root, n) in enumerate(zip(roots, counts, strict=True))]
            print(f"{mode:9s} " + " | ".join(cells), flush=True)
    finally:
        for t in targets:
            t.cleanup()
        cluster.destroy()
        if args.keep:
            print(f"callgrind files kept in {outdir}")
        else:
            shutil.rmtree(outdir, ignore_errors=True)
    return 0


def count_syscalls(targets: list[PgDoorman], roots: list[str], modes: list[str], tx: int, outdir: str,
                   pgbench: Callable[[PgDoorman, str, int], None]) -> None:
    """Print each tree's system calls per transaction, by name, for the calls made while N ran."""
    call = re.compile(r"^\d+\s+(?:<\.\.\. )?([a-z_0-9]+)[( ]")
    print(f"system calls per pgbench -S transaction ({tx} transactions, 1 client)")
    for mode in modes:
        per_root: list[collections.Counter[str]] = []
        for i, t in enumerate(targets):
            out = os.path.join(outdir, f"cg-{i}")
            pgbench(t, mode, 100)
            start = os.path.getsize(out)
            pgbench(t, mode, tx)
            with open(out, "rb") as f:
                f.seek(start)
                lines = f.read().decode(errors="replace").splitlines()
            names = collections.Counter(m.group(1) for line in lines if (m := call.match(line))
                                        and "resumed>" not in line)
            per_root.append(names)
        for root, names in zip(roots, per_root, strict=True):
            detail = ", ".join(f"{name} {n / tx:.2f}" for name, n in names.most_common(8))
            print(f"{mode:9s} {root}: {sum(names.values()) / tx:.2f} ({detail})", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
