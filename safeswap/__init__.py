"""safeswap: ship LLM prompt changes and model bumps like risky migrations.

What apps import: ``Emitter`` (send trace and feedback events), ``FlagClient``
(which variant a user sees). Statistics live in ``safeswap.stats``.
"""

from safeswap.emitter import Emitter
from safeswap.flags import FlagClient

__version__ = "0.1.0"
__all__ = ["Emitter", "FlagClient", "__version__"]
