"""The side-by-side benchmark (`python bench/run.py`, `orchestrator bench`): us and the peers."""
