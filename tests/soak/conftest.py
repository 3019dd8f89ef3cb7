"""Repeats the soak figures in pytest's terminal summary, so they show without -s."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from soak.load import REPORT

    if REPORT:
        terminalreporter.section("soak: faults, with nothing lost")
        for line in REPORT:
            terminalreporter.write_line(line)
