"""pdserve/flags: one flag style. A table row sets one frozen-config field; --help shows the
config's default; only flags the command line gave change the config; switches win."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from pdserve.flags.table import Flag, add_flags, flag_values, help_text, with_values


@dataclass(frozen=True)
class Retry:
    attempts: int = 5
    backoff_s: float = 0.05


@dataclass(frozen=True)
class Conf:
    host: str = "127.0.0.1"
    body_bytes: int = 8 * 2**20
    headers: tuple[str, ...] = ("x-request-id",)
    retry: Retry = field(default_factory=Retry)
    cache: bool = True


FLAGS = (
    Flag(("--host", "--bind"), "host", str, "bind address"),
    Flag(("--body-mb",), "body_bytes", float, "body cap in MiB", unit=2**20),
    Flag(("--headers",), "headers", str, "request id headers", nargs="*"),
    Flag(("--retries",), "retry.attempts", int, "tries"),
    Flag(("--backoff-ms",), "retry.backoff_s", float, "first backoff", unit=0.001),
    Flag(("--no-retries",), "retry.attempts", None, "one try", const=1),
    Flag(("--no-cache",), "cache", None, "cache off", const=False),
)


def parse(*argv: str) -> Conf:
    p = argparse.ArgumentParser()
    add_flags(p, FLAGS, Conf())
    return with_values(Conf(), flag_values(p.parse_args(argv), FLAGS, Conf()))


def test_nothing_given_is_the_config_default() -> None:
    assert parse() == Conf()


def test_aliases_units_nested_fields_and_lists() -> None:
    cfg = parse("--bind", "0.0.0.0", "--body-mb", "2", "--retries", "3", "--backoff-ms", "250", "--headers", "a", "b")
    assert cfg == Conf(host="0.0.0.0", body_bytes=2 * 2**20, headers=("a", "b"), retry=Retry(3, 0.25))
    assert isinstance(cfg.body_bytes, int)  # an int field stays int


def test_a_switch_wins_over_the_valued_flag_in_any_order() -> None:
    assert parse("--no-retries", "--retries", "9").retry.attempts == 1
    assert parse("--retries", "9", "--no-retries", "--no-cache") == Conf(retry=Retry(attempts=1), cache=False)


def test_help_shows_the_config_default_in_flag_units() -> None:
    flags = {f.names[0]: f for f in FLAGS}
    assert help_text(flags["--body-mb"], Conf()) == "body cap in MiB (default 8)"
    assert help_text(flags["--backoff-ms"], Conf(retry=Retry(backoff_s=0.5))) == "first backoff (default 500)"
    assert help_text(flags["--headers"], Conf()) == "request id headers (default x-request-id)"
    assert help_text(flags["--no-cache"], Conf()) == "cache off"  # a switch names no default
    assert help_text(Flag(("--x",), None, str, "x", shown="$ENV, else none"), Conf()) == "x (default: $ENV, else none)"


def test_serve_router_and_launch_show_their_configs_defaults() -> None:
    from pdserve.launch.config import LAUNCH_FLAGS, LaunchConfig
    from pdserve.router.cli import ALL_FLAGS as ROUTER_FLAGS
    from pdserve.router.config import RouterConfig
    from pdserve.server.config import ServerConfig
    from pdserve.server.serve import SERVE_FLAGS

    tables = ((SERVE_FLAGS, ServerConfig()), (ROUTER_FLAGS, RouterConfig()), (LAUNCH_FLAGS, LaunchConfig()))
    for flags, config in tables:
        port = next(f for f in flags if "--port" in f.names)
        assert help_text(port, config).endswith(f"(default {config.port})")
    with pytest.raises(ValueError, match="--disaggregation-decode-enable-radix-cache"):
        LaunchConfig(mode="unified", decode_radix_cache=True)
