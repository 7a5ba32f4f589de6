"""The `gallery` command line (the top floor: it may import every package below it, and none imports it)."""

from cli.app import main

__all__ = ["main"]
