"""`bricks` command line: thin commands over the Python API, one module per command group.

Every command prints a human summary, or JSON with `--json`; user errors end
with a one-line message and exit code 1, and leave no partial output.
"""

from . import adapters, analysis, compressing, fusing, merging, routing  # noqa: F401  (each module registers its commands)
from .common import main

__all__ = ["main"]
