"""Deterministic certification: the cascade (:mod:`.cascade`), the verify runner over batches,
datasets and run folders (:mod:`.runner`), and its results files, written and read (:mod:`.results`)."""
