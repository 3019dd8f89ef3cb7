"""`pgdoorman demo`: a throwaway PostgreSQL, the pooler in front of it, pgbench through both."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

from pgdoorman.config import render_config
from pgdoorman.devcluster import Cluster, free_port, wait_for_port

DURATION = 5
CLIENTS = 16
POOL_SIZE = 8


def _pgbench(cluster: Cluster, port: int, db: str, extra: list[str]) -> str:
    cmd = [cluster.tool("pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", *extra, db]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _tps(output: str) -> float:
    match = re.search(r"tps = ([0-9.]+)", output)
    return float(match.group(1)) if match else 0.0


def run_demo() -> int:
    print("creating a throwaway PostgreSQL cluster ...", flush=True)
    with Cluster(databases=["demo"]) as cluster, tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config = {
            "general": {"port": port, "pool_mode": "transaction"},
            "pools": {"demo": {"server_port": cluster.port, "users": {
                "0": {"username": "postgres", "password": "", "pool_size": POOL_SIZE}}}},
        }
        path = os.path.join(tmp, "pgdoorman.toml")
        with open(path, "w") as f:
            f.write(render_config(config))
        print(f"PostgreSQL on 127.0.0.1:{cluster.port}; pgdoorman on 127.0.0.1:{port} "
              f"(transaction mode, pool_size {POOL_SIZE})", flush=True)
        log = open(os.path.join(tmp, "pgdoorman.log"), "w")
        pooler = subprocess.Popen([sys.executable, "-m", "pgdoorman", "-c", path], stderr=log)
        try:
            wait_for_port("127.0.0.1", port)
            _pgbench(cluster, cluster.port, "demo", ["-i", "-s", "1", "-q"])
            args = ["-S", "-T", str(DURATION), "-c", str(CLIENTS), "-j", "2", "-M", "extended"]
            print(f"pgbench {' '.join(args)} directly and through pgdoorman ...", flush=True)
            direct = _tps(_pgbench(cluster, cluster.port, "demo", args))
            pooled = _tps(_pgbench(cluster, port, "demo", args))
        finally:
            pooler.terminate()
            pooler.wait(10)
            log.close()
        print(f"direct:    {direct:10.0f} tps ({CLIENTS} server connections)")
        print(f"pgdoorman: {pooled:10.0f} tps ({POOL_SIZE} server connections)")
        print("cleaned up: cluster and pooler stopped, temp files removed")
    return 0 if pooled > 0 else 1
