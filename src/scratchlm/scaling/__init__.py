"""Scaling laws: IsoFLOP sweeps of normal pretraining runs (sweep.py), Chinchilla-style fits
and compute-optimal plans (laws.py), and their report and plots (report.py)."""
