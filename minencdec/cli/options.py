"""Options several commands share."""

from __future__ import annotations

from minencdec.model.backend import BACKENDS


def add_backend_argument(parser, default="numba"):
    """The commands' --backend option (minencdec.model.backend names the two)."""
    parser.add_argument("--backend", default=default, choices=BACKENDS,
                        help=f"numba: the compiled fast path; numpy: the reference (default {default})")
