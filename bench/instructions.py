"""User-space instructions per transaction of pgdoorman (one worker), counted by valgrind.

TPS and CPU time vary by ±10 % between runs on a small shared machine; instruction counts do not,
so they show a change of 1 % in the pooler's own cost. Each source tree runs under callgrind; the
counters are zeroed after a warm-up and dumped after N pgbench -S transactions of one client.

    python -m bench.instructions --roots .,/tmp/base --tx 1000

(make /tmp/base with `git worktree add /tmp/base <commit>` and build its scanner there:
`python setup.py build_ext --inplace`). Kernel time (the reads and writes) is not counted: it is
the same for any relay that does one write per read.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import tempfile

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
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
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
            t.command = (lambda command=command, out=out:  # type: ignore[method-assign]
                         ["valgrind", "--tool=callgrind", "--cache-sim=no",
                          f"--callgrind-out-file={out}.%p", *command])
            t.start()
            targets.append(t)

        def pgbench(t: PgDoorman, mode: str, n: int) -> None:
            subprocess.run([cluster.tool("pgbench"), "-n", "-S", "-M", mode, "-c", "1", "-t", str(n),
                            "-h", cluster.host, "-p", str(t.port), "-U", USER, DATABASE],
                           capture_output=True, text=True, check=True)

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


if __name__ == "__main__":
    raise SystemExit(main())
