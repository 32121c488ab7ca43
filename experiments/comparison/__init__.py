"""Comparing SAE architectures at equal L0 (`python -m experiments.compare`): plan.py (run types, pairings, the
RunConfigs), runs.py (learning-rate choice, training or reuse, CE/KL), report.py (tables, claims, figures)."""
