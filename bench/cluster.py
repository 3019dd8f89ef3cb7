"""The PostgreSQL cluster under test: a devcluster with room for 500 direct clients, pgbench-initialised."""

from __future__ import annotations

import subprocess

from pgdoorman.devcluster import Cluster, Role

USER = "bench"
DATABASE = "bench"


def start_cluster(scale: int, max_connections: int) -> Cluster:
    """Start PostgreSQL (fsync off) with role `bench` (trust) and run `pgbench -i -s scale`."""
    cluster = Cluster(
        roles=[Role(USER, None, "trust")],
        databases=[DATABASE],
        settings={"max_connections": str(max_connections), "shared_buffers": "256MB"},
    )
    cluster.start()
    try:
        subprocess.run(
            [cluster.tool("pgbench"), "-i", "-q", "-s", str(scale), "-h", cluster.host,
             "-p", str(cluster.port), "-U", USER, DATABASE],
            check=True, capture_output=True, text=True,
        )
    except BaseException:
        cluster.destroy()
        raise
    return cluster
