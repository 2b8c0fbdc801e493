"""The package's names and defaults in one place (no torch import: the CLI reads it at start-up)."""

from __future__ import annotations

CASCADE_BUDGET = 30.0
"""Default seconds of bound computation per sample and threat for the cascade (``auto``); a sample
still open when its time is spent is recorded as ``timeout`` and counts as not certified."""
