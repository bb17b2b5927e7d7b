"""safeswap: ship LLM prompt changes and model bumps like risky migrations.

What apps import: ``Emitter`` (send trace and feedback events), ``FlagClient``
(which variant a user sees). Statistics live in ``safeswap.core.stats``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from safeswap.emitter import Emitter
    from safeswap.flags import FlagClient

__version__ = "0.1.0"
__all__ = ["Emitter", "FlagClient", "__version__"]
# Loaded on first use: they pull in aiokafka, which most CLI
# commands (every one starts by importing this package) never need.
_LAZY = {"Emitter": "safeswap.emitter", "FlagClient": "safeswap.flags"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'safeswap' has no attribute {name!r}")
