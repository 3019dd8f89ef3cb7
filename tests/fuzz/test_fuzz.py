"""The differential protocol fuzzer of issue 8 (see fuzzproto for the model, fuzzgen for scripts).

For each configuration in fuzzproto.CONFIGS (workers 1 and 2, transaction and session mode,
pool_size 1) hypothesis generates client scripts; each runs directly against PostgreSQL and through
pgdoorman, and the replies, the victim's view and the committed rows must agree.

    PGDOORMAN_FUZZ_EXAMPLES=N        examples per configuration (default: DEFAULT_EXAMPLES)
    PGDOORMAN_FUZZ_SHRINK_SECONDS=S  how long hypothesis may shrink a failure (default 60)
    PGDOORMAN_FUZZ_TIMEOUT=S         seconds to wait for each reply (default 2; the victim: S + 1.5)
    PGDOORMAN_FUZZ_SKIP=a,b          features not to generate, to look past a known bug (see fuzzgen.SKIP)
    PGDOORMAN_FUZZ_RANDOM=1          new random examples (default: the same derandomized ones every run)

Runs are random (no example database, no fixed seed). A failure prints the minimal script as Python
source: add it to tests/fuzz/test_fuzz_regressions.py.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
from fuzzgen import steps
from fuzzproto import FuzzEnv, check_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DEFAULT_EXAMPLES = 450  # per configuration: 1800 in all, about 3 minutes on 2 cores (more: the variable)
EXAMPLES = int(os.environ.get("PGDOORMAN_FUZZ_EXAMPLES") or DEFAULT_EXAMPLES)
SHRINK_SECONDS = float(os.environ.get("PGDOORMAN_FUZZ_SHRINK_SECONDS") or 60)
# CI runs the same examples every time (a commit is green or not, not by luck);
# PGDOORMAN_FUZZ_RANDOM=1 explores new ones (and every finding becomes a regression test).
RANDOM = os.environ.get("PGDOORMAN_FUZZ_RANDOM", "") not in ("", "0")


@contextlib.contextmanager
def shrink_limit(seconds: float) -> Iterator[None]:
    """Hypothesis shrinks for up to 5 minutes; a hanging pooler makes every attempt cost seconds."""
    try:
        from hypothesis.internal.conjecture import engine
    except ImportError:  # pragma: no cover - internal module moved: keep hypothesis' own limit
        yield
        return
    old = getattr(engine, "MAX_SHRINKING_SECONDS", None)
    if old is None:
        yield
        return
    engine.MAX_SHRINKING_SECONDS = seconds  # type: ignore[attr-defined]
    try:
        yield
    finally:
        engine.MAX_SHRINKING_SECONDS = old  # type: ignore[attr-defined]


@pytest.mark.timeout(int(600 + 4 * EXAMPLES + 2 * SHRINK_SECONDS))
def test_fuzz(fuzz_env: FuzzEnv) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
              derandomize=not RANDOM)
    @given(data=st.data())
    def one_script(data: st.DataObject) -> None:
        script = data.draw(steps(fuzz_env.mode), label="script")
        check_script(fuzz_env, script)

    with shrink_limit(SHRINK_SECONDS):
        one_script()
