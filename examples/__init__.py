"""Runnable examples of a2a in an engine-style setting (`python -m examples.<name>`)."""
