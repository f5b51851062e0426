"""CLI commands for audit and delivery queries: deliveries, replay, audit export/verify/rebuild.

Registered into the ``notice-relay`` parser by :func:`register`; like the rest of the
CLI, they parse and hand off.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add this module's subcommands to the ``notice-relay`` parser."""
    _ = argparse
