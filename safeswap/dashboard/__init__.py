"""``safeswap dashboard``: a web page on 127.0.0.1, live from Kafka or from a recorded dataset.

Pieces: :mod:`.model` (what is shown, as plain data, fed the same way live or
recorded), :mod:`.sources` (Kafka tail / Parquet reader), :mod:`.charts` (inline
SVG rendered in Python), :mod:`.page` (HTML, the style sheet and the small
polling script), :mod:`.server` (aiohttp). The command is ``safeswap.cli.dashboard``; docs/dashboard.md has the tour.
"""

from __future__ import annotations
