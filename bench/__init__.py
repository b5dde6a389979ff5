"""Benchmarks of cdc-stream, run by hand: ``python -m bench`` or ``make bench``."""
