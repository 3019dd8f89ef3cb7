"""Command line: `pgdoorman -c FILE`, `--check-config`, `--version`, `pgdoorman demo`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any

from pgdoorman import __version__
from pgdoorman.config import (
    Config,
    ConfigError,
    default_config,
    load_config,
    parse_config,
    pool_keys,
    worker_count,
)
from pgdoorman.fdlimit import raise_nofile_limit
from pgdoorman.logs import force_log_level, setup_logging
from pgdoorman.process.pidfile import remove_pidfile, write_pidfile


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgdoorman", description="PostgreSQL connection pooler")
    p.add_argument("command", nargs="?", choices=["run", "demo", "upgrade"], default="run",
                   help="run the pooler (default); `demo`: a throwaway PostgreSQL + pooler + pgbench; "
                        "`upgrade`: have the running pooler (by general.pidfile or --pid, else the "
                        "console's unix socket) hand over to the program now on disk")
    p.add_argument("--pid", type=int,
                   help="upgrade: the running pooler's pid (default: from general.pidfile)")
    p.add_argument("-c", "--config", help="TOML config file (default: the embedded config)")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit 0/1")
    p.add_argument("--version", action="version", version=f"pgdoorman {__version__}")
    p.add_argument("--log-level", help="override general.log_level")
    # Internal: how the acceptor starts worker I of N (see pgdoorman/acceptor.py).
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--channel-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--config-fd", type=int, help=argparse.SUPPRESS)  # the acceptor's running config
    # Internal: an upgrade's successor (pgdoorman/process/upgrade.py)
    p.add_argument("--upgrade-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--generation", type=int, default=0, help=argparse.SUPPRESS)
    return p


def _load(path: str | None, fd: int | None = None) -> Config:
    if fd is not None:
        with os.fdopen(fd, "rb") as f:
            return parse_config(f.read().decode(), path or "<config>")
    return load_config(path) if path else default_config()


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # the pure-asyncio fallback keeps working, just slower
        asyncio.run(main)
    else:
        uvloop.run(main)


def _fds_needed(config: Config, workers: int) -> int:
    """Descriptors one worker (or the single process) may hold: its share of max_client_conn and of the
    servers, and some for listeners, the loop and logs."""
    servers = sum(config.pools[db].users[user].pool_size for db, user in pool_keys(config))
    return -(-(config.general.max_client_conn + servers) // workers) + 32


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from pgdoorman.demo import run_demo

        return run_demo()
    try:
        config = _load(args.config, args.config_fd)
    except ConfigError as exc:
        print(f"pgdoorman: {exc}", file=sys.stderr)
        return 1
    if args.check_config:
        print(f"{config.path}: ok ({len(config.pools)} pools)")
        return 0
    if args.command == "upgrade":
        from pgdoorman.process.command import upgrade_running

        return upgrade_running(config, args.pid)
    if args.log_level:
        force_log_level(args.log_level)
    setup_logging(config.general.log_level, config.general.log_format)
    log = logging.getLogger("pgdoorman")
    try:
        if args.worker:
            worker, workers = (int(x) for x in args.worker.split("/"))
            log.info("worker %d of %d starting", worker, workers)
            raise_nofile_limit(_fds_needed(config, workers))
            from pgdoorman.app import serve

            _run(serve(config, worker, workers, args.channel_fd, args.generation))
            return 0
        workers = worker_count(config)
        log.info("pgdoorman %s starting with %s, %d worker%s", __version__, config.path, workers,
                 "s" if workers > 1 else "")
        # (The acceptor holds a few descriptors at a time; its workers inherit the raised limit.)
        raise_nofile_limit(_fds_needed(config, 1) if workers == 1 else 0)
        if args.upgrade_fd is None:
            write_pidfile(config.general.pidfile)
        if workers > 1:
            from pgdoorman.acceptor import serve_workers

            _run(serve_workers(config, workers, args.config, args.log_level, args.generation,
                               args.upgrade_fd))
        else:
            from pgdoorman.app import serve
            from pgdoorman.process.upgrade import program_argv

            _run(serve(config, generation=args.generation, upgrade_fd=args.upgrade_fd,
                       upgrade_argv=program_argv(args.config, args.log_level)))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        if not args.worker:
            remove_pidfile(config.general.pidfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
