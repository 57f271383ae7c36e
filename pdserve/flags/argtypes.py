"""argparse `type=` checkers shared by every CLI (light: the router uses them too), so a bad
value fails at parse time with argparse's one-line usage error."""

from __future__ import annotations

import argparse
import re


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def port_number(text: str) -> int:
    """A TCP port: 0..65535 (0 = any free port where a caller allows it)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535, got {value}")
    return value


_PREFIX = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def metrics_prefix(text: str) -> str:
    """A Prometheus metric-name prefix (letters, digits, underscores; no leading digit)."""
    if not _PREFIX.match(text):
        raise argparse.ArgumentTypeError(f"not a Prometheus name prefix: {text!r}")
    return text


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line naming it (`pdserve serve: error: ...`) and exit code 2, not the
    whole usage text: a supervisor's log shows what is wrong at a glance (`--help` has the rest).
    Sub-command parsers inherit it (argparse makes them of their parent's class)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")
