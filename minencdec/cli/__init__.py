"""The `minencdec` command: every subcommand is a thin shell over the rooms below it.
Everything may be imported here; nothing imports this package."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
