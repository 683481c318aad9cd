"""Benchmarks of synthgen against stock references (see run_all.py)."""
