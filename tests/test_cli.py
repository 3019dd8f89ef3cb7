"""The command line: --version, --check-config exit codes and messages, a bad config at start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pgdoorman import __version__


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgdoorman", *args], capture_output=True, text=True,
                          timeout=30)


def test_version() -> None:
    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"pgdoorman {__version__}"


def test_check_config_ok(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text('[pools.db.users.0]\nusername = "app"\npassword = ""\n')
    proc = _run("--check-config", "-c", str(path))
    assert proc.returncode == 0, proc.stderr


def test_check_config_names_file_line_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[general]\nport = 6432\n\n'
                    '[pools.db.users.0]\nusername = "app"\npassword = ""\npool_sise = 3\n')
    proc = _run("--check-config", "-c", str(path))
    assert proc.returncode == 1
    assert f"{path}:7: pools.db.users.0.pool_sise: unknown key (did you mean 'pool_size'?)" in proc.stderr


def test_bad_config_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[general]\nport = "six"\n')
    proc = _run("-c", str(path))
    assert proc.returncode == 1
    assert f"{path}:2: general.port: expected integer, got string" in proc.stderr


def test_embedded_default_config_is_valid() -> None:
    proc = _run("--check-config")
    assert proc.returncode == 0, proc.stderr
