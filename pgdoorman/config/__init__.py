"""Configuration: typed schema, TOML loader with FILE:LINE: key errors, embedded defaults, TOML renderer."""

from .durations import format_duration, parse_duration
from .loader import default_config, load_config, parse_config
from .render import render_config
from .schema import (
    LOG_LEVELS,
    POOL_MODES,
    RESTART_KEYS,
    SIZE_KEYS,
    Config,
    ConfigError,
    GeneralConfig,
    PoolConfig,
    PrometheusConfig,
    UserConfig,
)
from .sizes import format_size, parse_size
from .workers import pool_keys, pool_share, worker_count

__all__ = [
    "LOG_LEVELS",
    "POOL_MODES",
    "RESTART_KEYS",
    "SIZE_KEYS",
    "format_size",
    "parse_size",
    "PrometheusConfig",
    "Config",
    "ConfigError",
    "GeneralConfig",
    "PoolConfig",
    "UserConfig",
    "default_config",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
    "pool_keys",
    "pool_share",
    "render_config",
    "worker_count",
]
