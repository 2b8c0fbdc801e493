"""Deterministic certification: per-sample bounds under several threats and methods, the cascade,
union accuracy and the results files."""
