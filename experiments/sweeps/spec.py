"""What a sweep file may hold (W&B's sweep YAML plus `count` and `out_root`), its validation and loading."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, TypedDict

import torch
import yaml

from experiments import training
from experiments.wandb_logging import scalar_metrics
from sae.config import fields_with_role
from sae.errors import SAEConfigError
from sae.metrics import MetricsAccumulator

METHODS = ("grid", "random", "bayes")


GOALS = ("minimize", "maximize")


DISTRIBUTIONS = (
    "constant",
    "categorical",
    "uniform",
    "q_uniform",
    "int_uniform",
    "log_uniform",
    "log_uniform_values",
    "q_log_uniform_values",
)
"""Supported `distribution:` names (W&B's meanings; log_uniform's min/max are natural-log exponents)."""


POSITIVE_DISTRIBUTIONS = ("log_uniform_values", "q_log_uniform_values")


SPEC_KEYS = ("value", "values", "probabilities", "distribution", "min", "max", "q")


class Metric(TypedDict):
    """What a sweep ranks its runs by."""

    name: str
    goal: str  # "minimize" or "maximize"


class Sweep(TypedDict, total=False):
    """A sweep file as `load_sweep` returns it, validated: W&B's sweep keys plus `count` (runs for random/bayes)
    and `out_root` (this tool's). parameters maps a RunConfig/SAEConfig/TrainConfig field to a W&B parameter
    spec ({value}, {values[, probabilities]}, or {distribution, min, max[, q]})."""

    name: str
    description: str
    method: str
    metric: Metric
    parameters: dict[str, dict[str, Any]]
    run_cap: int
    count: int
    out_root: str
    project: str
    entity: str
    program: str
    command: list[str]
    early_terminate: dict[str, Any]


TOP_KEYS = tuple(Sweep.__annotations__)
"""Keys a sweep file may hold (the Sweep fields, in order)."""


LOCAL_ONLY_KEYS = ("count", "out_root")
RUN_METRICS = ("train_seconds", "train_tokens", "train_tokens_per_s", "eval_rows", "batch_mode/l0", "batch_mode/fvu")
"""Numbers train_run adds to the eval metrics (batch_mode/* for Mutual- and Feature-Choice)."""


def allowed_parameters() -> list[str]:
    """Names a sweep may vary: RunConfig fields and the SAE/trainer options a RunConfig accepts."""
    own = {f.name for f in dataclasses.fields(training.RunConfig)} - {"options", "out"}
    options = fields_with_role() - training.RESERVED
    return sorted(own | options)


def known_metrics() -> list[str]:
    """Names a run's eval metrics hold: every number `sae.evaluate` reports plus what train_run adds."""
    probe = MetricsAccumulator(2)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    probe.update(x, x, x)
    return sorted(set(scalar_metrics(probe.compute())) | set(RUN_METRICS))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def distribution_of(spec: dict[str, Any]) -> str:
    """The spec's distribution, inferred as W&B does: value -> constant, values -> categorical,
    min/max alone -> int_uniform when both are integers, else uniform."""
    if "distribution" in spec:
        return spec["distribution"]
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    both_ints = all(isinstance(spec.get(k), int) and not isinstance(spec.get(k), bool) for k in ("min", "max"))
    return "int_uniform" if both_ints else "uniform"


def _parameter_problems(name: str, spec: Any, method: str | None) -> list[str]:
    where = f"parameter {name!r}"
    if not isinstance(spec, dict):
        return [
            f"{where} must be a mapping such as {{value: 32}}, {{values: [16, 32]}} or "
            f"{{distribution: uniform, min: 0.1, max: 1}}; got {spec!r}"
        ]
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        return [f"{where} has unknown key(s) {unknown}; allowed: {', '.join(SPEC_KEYS)}"]
    if not any(k in spec for k in ("value", "values", "distribution", "min", "max")):
        return [f"{where} needs `value`, `values`, or a distribution with min and max"]
    if "value" in spec and "values" in spec:
        return [f"{where} has both `value` and `values`; give one"]
    dist = distribution_of(spec)
    if dist not in DISTRIBUTIONS:
        return [f"{where} has unknown distribution {dist!r}; supported: {', '.join(DISTRIBUTIONS)}"]
    problems = []
    if dist == "constant" and "value" not in spec:
        problems.append(f"{where}: distribution constant needs `value`")
    if dist == "categorical":
        values = spec.get("values")
        if not isinstance(values, list):
            problems.append(f"{where}: `values` must be a list, got {values!r}")
        elif not values:
            problems.append(f"{where} has an empty values list")
        elif "probabilities" in spec:
            probs = spec["probabilities"]
            if (
                not isinstance(probs, list)
                or len(probs) != len(values)
                or not all(_number(p) and p >= 0 for p in probs)
                or not math.isclose(sum(probs), 1.0, abs_tol=1e-6)
            ):
                problems.append(f"{where}: `probabilities` must be {len(values)} non-negative numbers summing to 1")
    if dist not in ("constant", "categorical"):
        low, high = spec.get("min"), spec.get("max")
        if low is None or high is None:
            problems.append(f"{where}: distribution {dist} needs both min and max")
        elif not (_number(low) and _number(high)):
            problems.append(f"{where}: min and max must be numbers, got {low!r} and {high!r}")
        elif low >= high:
            problems.append(f"{where}: min ({low}) must be smaller than max ({high})")
        elif dist == "int_uniform" and not (isinstance(low, int) and isinstance(high, int)):
            problems.append(f"{where}: int_uniform needs integer min and max, got {low!r} and {high!r}")
        elif dist in POSITIVE_DISTRIBUTIONS and low <= 0:
            problems.append(f"{where}: {dist} needs min > 0, got {low}")
        if "q" in spec and not (_number(spec["q"]) and spec["q"] > 0):
            problems.append(f"{where}: q must be a positive number, got {spec['q']!r}")
        if method == "grid":
            problems.append(
                f"{where} has distribution {dist}, which a grid cannot enumerate; "
                "give it `values: [...]` or use method: random"
            )
    return problems


def is_finite(spec: dict[str, Any]) -> bool:
    return distribution_of(spec) in ("constant", "categorical")


def _count_problems(data: dict[str, Any], count: int | None) -> list[str]:
    problems = []
    for key in ("count", "run_cap"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"`{key}` must be a positive integer, got {value!r}")
    params = data.get("parameters")
    if (
        data.get("method") in ("random", "bayes")
        and isinstance(params, dict)
        and count is None
        and data.get("count") is None
        and data.get("run_cap") is None
        and not all(isinstance(s, dict) and is_finite(s) for s in params.values())
    ):
        problems.append(
            f"{data['method']} search over a distribution never runs out of samples: "
            "add `count: N` (or `run_cap: N`) to the file, or pass --count N"
        )
    return problems


def validate_sweep(data: dict[str, Any], count: int | None = None) -> list[str]:
    """Every problem of a parsed sweep file, one message each (empty when it is usable)."""
    problems = []
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        problems.append(f"unknown key(s) {unknown}; a sweep file holds: {', '.join(TOP_KEYS)}")
    method = data.get("method")
    if method is None:
        problems.append(f"missing `method`: one of {', '.join(METHODS)}")
    elif method not in METHODS:
        problems.append(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    metric = data.get("metric")
    if metric is None:
        if method == "bayes":
            problems.append("bayes search needs a `metric` to optimise, e.g. metric: {name: fvu, goal: minimize}")
    elif not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        problems.append(f"`metric` needs a name, e.g. metric: {{name: fvu, goal: minimize}}; got {metric!r}")
    else:
        if set(metric) - {"name", "goal", "target"}:
            problems.append(
                f"`metric` has unknown key(s) {sorted(set(metric) - {'name', 'goal', 'target'})}; "
                "allowed: name, goal, target"
            )
        if metric.get("goal", "minimize") not in GOALS:
            problems.append(f"unknown metric goal {metric['goal']!r}; allowed: {', '.join(GOALS)}")
        known = known_metrics()
        if metric["name"] not in known:
            problems.append(f"metric {metric['name']!r} is not a number a run reports; known: {', '.join(known)}")
    if data.get("out_root") is not None and not isinstance(data["out_root"], str):
        problems.append(f"`out_root` must be a folder path, got {data['out_root']!r}")
    params = data.get("parameters")
    if not isinstance(params, dict) or not params:
        problems.append(
            "missing `parameters`: a mapping of field name -> {value: x} | {values: [...]} | "
            "{distribution: ..., min: ..., max: ...}"
        )
        params = {}
    allowed = allowed_parameters()
    for name, spec in params.items():
        if name == "out":
            problems.append("parameter 'out' is set per run (<out root>/<run name>); set `out_root` or pass --out")
        elif name not in allowed:
            problems.append(
                f"unknown parameter {name!r}: not a RunConfig, SAEConfig or TrainConfig field; "
                f"allowed: {', '.join(allowed)}"
            )
        else:
            problems.extend(_parameter_problems(name, spec, method))
    if params and "activations" not in params:
        problems.append(
            "parameters need `activations` (an activation cache folder), e.g. activations: {value: runs/demo/cache}"
        )
    return problems + _count_problems(data, count)


def load_sweep(path: str | Path, *, count: int | None = None) -> Sweep:
    """Read and validate a sweep YAML file; its `name` defaults to the file's stem.

    `count` is the --count given on the command line (random search needs a count from somewhere).
    """
    path = Path(path)
    if not path.is_file():
        raise SAEConfigError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SAEConfigError(f"sweep file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SAEConfigError(f"sweep file {path} must hold a mapping with method, metric and parameters")
    problems = validate_sweep(data, count)
    if len(problems) == 1:
        raise SAEConfigError(f"sweep file {path}: {problems[0]}")
    if problems:
        raise SAEConfigError(f"sweep file {path} has {len(problems)} problems:\n  - " + "\n  - ".join(problems))
    return {"name": path.stem, **data}


def run_count(sweep: Sweep, count: int | None = None) -> int | None:
    """How many runs: --count, else the smaller of the file's count and run_cap; None means all of a grid."""
    if count is not None:
        return count
    caps = [sweep[k] for k in ("count", "run_cap") if sweep.get(k) is not None]
    return min(caps) if caps else None
