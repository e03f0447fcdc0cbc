"""Data sources: the shipped wiki summaries and local jsonl files, as fixed train/eval samples."""
