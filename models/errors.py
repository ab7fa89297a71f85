"""Errors of bad input that callers without the engine catch (the CLI reports them in one line
before anything has loaded torch). No torch here."""

from __future__ import annotations


class DatasetError(ValueError):
    """Bad or unreadable data; the message names the offending file (and item/index where
    relevant)."""
