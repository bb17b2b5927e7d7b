"""The pure core: decisions, windows, joins and statistics as functions of plain data.

Nothing here imports a Kafka client, Faust, the CLI or an agent: the worker's agents,
the tools (simulate, replay, dashboard) and the tests call the same functions.
This module imports nothing, so the app SDK can use ``safeswap.core.assignment``
without loading numpy or scipy.
"""
