"""Cross-framework benchmarks of tlcore against hand-written native loops (``python -m benchmarks``)."""
