"""safeswap: ship LLM prompt changes and model bumps like risky migrations."""

__version__ = "0.1.0"
