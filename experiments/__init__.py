"""Experiments: the saewb CLI, configs, W&B wiring, sweeps and analysis runs."""
