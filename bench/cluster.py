"""The PostgreSQL cluster under test: a devcluster with room for 500 direct clients, pgbench-initialised."""

from __future__ import annotations

import subprocess

from bench.tlscert import ServerCert
from pgdoorman.devcluster import Cluster, Role

USER = "bench"
DATABASE = "bench"


def start_cluster(scale: int, max_connections: int, tls: ServerCert | None = None) -> Cluster:
    """Start PostgreSQL (fsync off) with role `bench` (trust) and run `pgbench -i -s scale`.

    With `tls`, PostgreSQL also accepts TLS (ssl = on, that certificate): the direct target is then measured
    with TLS like the poolers. Its pg_hba `host` lines accept clear and TLS connections alike, so the
    poolers' own server connections can stay in clear text.
    """
    settings = {"max_connections": str(max_connections), "shared_buffers": "256MB"}
    files: dict[str, bytes] = {}
    if tls is not None:
        settings |= {"ssl": "on", "ssl_cert_file": "'server.crt'", "ssl_key_file": "'server.key'"}
        files = {"server.crt": tls.cert_pem, "server.key": tls.key_pem}
    cluster = Cluster(
        roles=[Role(USER, None, "trust")],
        databases=[DATABASE],
        settings=settings,
        files=files,
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
