"""Fixtures of the differential fuzzer: `fuzz_env`, one pgdoorman per configuration and module.

Each test module that uses `fuzz_env` gets the four configurations of fuzzproto.CONFIGS (workers 1
and 2, transaction and session mode, pool_size 1), each pooler started once for the module.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzzproto import CONFIGS, FuzzEnv  # noqa: E402
from helpers import PoolerLauncher  # noqa: E402


@pytest.fixture(scope="module", params=CONFIGS, ids=[c.name for c in CONFIGS])
def fuzz_env(request: pytest.FixtureRequest, pg,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzEnv]:
    cfg = request.param
    launcher = PoolerLauncher(tmp_path_factory.mktemp(f"fuzz-{cfg.name}"), pg)
    env = FuzzEnv(cfg, pg, launcher)
    try:
        yield env
    finally:
        if env.examples:
            print(f"\n[fuzz {cfg.name}] {env.examples} examples in {env.seconds:.1f}s "
                  f"({env.seconds / env.examples * 1000:.0f} ms each)")
        env.close()
        launcher.stop_all()
