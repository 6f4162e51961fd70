"""Options several commands share, and argparse types that turn a bad number into a one-line
usage error naming the option ("argument --batch-size: must be a positive integer, got 0")."""

from __future__ import annotations

import argparse
import math

from minencdec.model.backend import BACKENDS


def add_backend_argument(parser, default="numba"):
    """The commands' --backend option (minencdec.model.backend names the two)."""
    parser.add_argument("--backend", default=default, choices=BACKENDS,
                        help=f"numba: the compiled fast path; numpy: the reference (default {default})")


def _number(kind, text):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def positive_float(text) -> float:
    value = _number(float, text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def non_negative_float(text) -> float:
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value}")
    return value


def unit_interval(text) -> float:
    """A number in [0, 1] (a weight such as distillation's alpha)."""
    value = _number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value
