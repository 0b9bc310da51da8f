"""chatgate's benchmark suite: ``python -m bench`` (see docs/PERFORMANCE.md)."""
