"""asv benchmark suites for pagetable (see docs/PERFORMANCE.md); run with ``asv run``."""
