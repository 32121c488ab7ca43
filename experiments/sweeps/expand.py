"""A sweep expanded locally: a grid's cartesian product or seeded random draws, and each run's folder name."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

from experiments.sweeps.spec import POSITIVE_DISTRIBUTIONS, Sweep, distribution_of, is_finite, run_count
from sae.errors import SAEConfigError


def _choices(spec: dict[str, Any]) -> list[Any]:
    return [spec["value"]] if "value" in spec else list(spec["values"])


def sample_value(spec: dict[str, Any], rng: random.Random) -> Any:
    """One draw from a parameter spec (W&B's distribution semantics)."""
    dist = distribution_of(spec)
    if dist == "constant":
        return spec["value"]
    if dist == "categorical":
        return rng.choices(spec["values"], weights=spec.get("probabilities"))[0]
    low, high = spec["min"], spec["max"]
    if dist == "int_uniform":
        return rng.randint(low, high)
    if dist == "log_uniform":
        return math.exp(rng.uniform(low, high))
    if dist in POSITIVE_DISTRIBUTIONS:
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    if dist.startswith("q_"):
        q = spec.get("q", 1)
        value = round(value / q) * q
        return int(value) if all(isinstance(v, int) for v in (low, high, q)) else value
    return value


def local_runs(sweep: Sweep, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The parameter sets of a sweep run here: grid -> the cartesian product (first `count` of it);
    random -> `count` seeded samples, or the whole grid in a seeded order when every parameter is a
    finite list; bayes -> random, with a note (bayes needs W&B's sweep server)."""
    params = sweep["parameters"]
    n = run_count(sweep, count)
    finite = all(is_finite(spec) for spec in params.values())

    def combos() -> Iterator[dict[str, Any]]:  # only called when every parameter is a finite list
        for combo in itertools.product(*map(_choices, params.values())):
            yield dict(zip(params, combo, strict=True))

    if sweep["method"] == "grid":
        if not finite:
            raise SAEConfigError("a grid sweep needs `value`/`values` for every parameter")
        return list(itertools.islice(combos(), n))
    rng = random.Random(seed)
    if sweep["method"] == "bayes":
        print(
            "[saewb sweep] bayes search needs W&B's sweep server; sampling the runs at random instead", file=sys.stderr
        )
    if n is None:
        if not finite:
            raise SAEConfigError(
                f"{sweep['method']} search over a distribution needs a count (count:, run_cap: or --count)"
            )
        grid = list(combos())
        rng.shuffle(grid)
        return grid
    return [{name: sample_value(spec, rng) for name, spec in params.items()} for _ in range(n)]


def varying_parameters(sweep: Sweep) -> list[str]:
    """Parameters that take more than one value in this sweep (they name the runs)."""
    return [name for name, spec in sweep["parameters"].items() if not (is_finite(spec) and len(_choices(spec)) == 1)]


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str | int | bool) or value is None:
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def run_name(params: dict[str, Any], varying: list[str]) -> str:
    """A folder-safe name from the varying parameters, e.g. ``arch=topk,k=32`` (``run`` when none vary)."""
    name = ",".join(f"{key}={_format(params[key])}" for key in varying if key in params) or "run"
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    if len(name) > 120:
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def run_names(sweep: Sweep, runs: list[dict[str, Any]]) -> list[str]:
    """run_name per run; a repeated name (the same sample drawn twice) gets -2, -3... in order."""
    varying, seen, names = varying_parameters(sweep), Counter(), []
    for params in runs:
        base = run_name(params, varying)
        seen[base] += 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names
