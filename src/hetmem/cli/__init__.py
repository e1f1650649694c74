"""The ``hetmem`` command line: one module per subcommand; nothing in the library imports this package."""

from hetmem.cli.main import main

__all__ = ["main"]
