"""Files: run folders (create, resume, overwrite, lock), shards and their merge, checkpoints and
atomic writes."""
