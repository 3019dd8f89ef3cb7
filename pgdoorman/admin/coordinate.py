"""What happens once for the whole pooler before a console request reaches the workers: RELOAD
and SET check the new config (an invalid one is refused and the running one kept), SHUTDOWN
starts the process's own shutdown. The acceptor does this with several workers; the single
process does it itself (single()).
"""

from __future__ import annotations

import asyncio
import logging
import tomllib
from typing import TYPE_CHECKING, Any

from pgdoorman import sdnotify
from pgdoorman.config import Config, ConfigError, load_config, parse_config, render_config
from pgdoorman.metrics.stats import percentile

if TYPE_CHECKING:
    from pgdoorman.app import App

log = logging.getLogger("pgdoorman.admin")

IMMEDIATE, WAIT_FOR_SERVERS, WAIT_FOR_CLIENTS = "immediate", "wait_for_servers", "wait_for_clients"
SHUTDOWN_MODES = (IMMEDIATE, WAIT_FOR_SERVERS, WAIT_FOR_CLIENTS)


def setting_value(text: str) -> Any:
    """A console SET value as the TOML file would have it: 'quoted' (SQL quoting) or "quoted" is
    a string, true/false a boolean, digits a number; anything else is taken as a string."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    if text.lower() in ("true", "false", "on", "off"):
        return text.lower() in ("true", "on")
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def next_config(request: dict[str, Any], config: Config) -> Config:
    """The config a RELOAD (the file again) or SET key = value (the running one, changed) leads
    to. ConfigError, worded FILE:LINE: key: what is wrong, when it is not valid."""
    if request["op"] == "reload":
        return load_config(config.path)
    key, value = request["key"], setting_value(request["value"])
    data = tomllib.loads(config.text) if config.text else {}
    data.setdefault("general", {})[key] = value
    try:
        return parse_config(render_config(data), config.path)
    except ConfigError as exc:  # its line is of the rendered text: name the SET instead
        raise ConfigError(f"SET {key}: {exc.reason}", key=exc.key, reason=exc.reason) from None


def restart_note(restart: list[str]) -> str:
    return f"changed keys that need a restart, not applied: {', '.join(restart)}" if restart else ""


async def single(app: App, request: dict[str, Any]) -> list[Any]:
    """A console request in a pooler of one process."""
    op = request["op"]
    if op in ("reload", "set"):
        try:
            config = next_config(request, app.config)
        except ConfigError as exc:
            log.error("%s refused, the running config is kept: %s", op.upper(), exc)
            return [{"error": str(exc)}]
        sdnotify.notify("RELOADING=1")
        result = app.reload_text(config.text, config.path)
        log.info(
            "%s: config %s applied%s",
            op.upper(),
            config.path,
            f"; {restart_note(result.get('restart', []))}" if result.get("restart") else "",
        )
        sdnotify.notify(f"READY=1\nSTATUS={app.status_line()}")
        return [result]
    if op == "shutdown":
        asyncio.get_running_loop().call_soon(app.begin_shutdown, request["mode"])  # after the answer
        return [True]
    if op == "upgrade":
        return [await app.upgrade()]
    return [await app.answer(request)]


def stats_line(last: dict[str, Any], seconds: float) -> str:
    """PgBouncer's periodic stats line for one pool's last period."""
    xacts, queries = last["xacts"], last["queries"]
    waits = last["waits"]
    return (
        f"{xacts / seconds:.0f} xacts/s, {queries / seconds:.0f} queries/s, "
        f"in {last['received'] / seconds:.0f} B/s, out {last['sent'] / seconds:.0f} B/s, "
        f"xact {last['xact_time'] / max(xacts, 1) * 1e6:.0f} us, "
        f"query {last['query_time'] / max(queries, 1) * 1e6:.0f} us, "
        f"wait {last['wait_time'] / max(waits, 1) * 1e6:.0f} us, "
        f"query p99 {percentile(last['query_hist'], 0.99) * 1e6:.0f} us, errors {last['errors']}"
    )
