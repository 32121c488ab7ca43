"""Hyperparameter sweeps in W&B's sweep YAML format, run by a W&B agent (online) or expanded here.

A parameter is any RunConfig field or SAEConfig/TrainConfig field, as in a `saewb train` config
file. Locally a grid is the cartesian product of the values, random search draws seeded samples,
and bayes (which needs W&B's server) falls back to random. Every run trains into its own folder;
one whose eval.json exists is reused, so rerunning an interrupted sweep resumes it.

Modules: spec (what a sweep file may hold, validation, loading), expand (local grid / random runs and their
names), runner (local or W&B agent), results (ordering, results.json, the table). The shipped example sweeps are
the *.yaml files of this folder.
"""
