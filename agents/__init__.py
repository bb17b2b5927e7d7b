"""Faust agents: thin loops that move data between topics and pure step functions."""
