"""Hyperparameter sweeps in W&B's sweep YAML format, run by a W&B agent (online) or expanded here.

A parameter is any RunConfig field or SAEConfig/TrainConfig field, as in a `saewb train` config
file. Locally a grid is the cartesian product of the values, random search draws seeded samples,
and bayes (which needs W&B's server) falls back to random. Every run trains into its own folder;
one whose eval.json exists is reused, so rerunning an interrupted sweep resumes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import random
import re
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from experiments import multi_train, training
from experiments.wandb_logging import WandbRun, make_log_fn, resolve_mode, scalar_metrics
from sae.errors import SAEConfigError, SAEError

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
TOP_KEYS = (
    "name",
    "description",
    "method",
    "metric",
    "parameters",
    "run_cap",
    "count",
    "out_root",
    "project",
    "entity",
    "program",
    "command",
    "early_terminate",
)
"""Keys a sweep file may hold: W&B's, plus `count` (runs for random/bayes) and `out_root` (this tool's)."""
LOCAL_ONLY_KEYS = ("count", "out_root")
RUN_METRICS = ("train_seconds", "train_tokens", "train_tokens_per_s", "eval_rows", "batch_mode/l0", "batch_mode/fvu")
"""Numbers train_run adds to the eval metrics (batch_mode/* for Mutual- and Feature-Choice)."""
TABLE_METRICS = ("l0", "fvu", "explained_variance", "dead_frac", "dense_frac")


# -- validation -----------------------------------------------------------------------------------


def allowed_parameters() -> list[str]:
    """Names a sweep may vary: RunConfig fields and the SAE/trainer options a RunConfig accepts."""
    from sae.config import SAEConfig, TrainConfig

    own = {f.name for f in dataclasses.fields(training.RunConfig)} - {"options", "out"}
    options = {f.name for cls in (SAEConfig, TrainConfig) for f in dataclasses.fields(cls)} - training.RESERVED
    return sorted(own | options)


def known_metrics() -> list[str]:
    """Names a run's eval metrics hold: every number `sae.evaluate` reports plus what train_run adds."""
    import torch

    from sae.metrics import MetricsAccumulator

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


def _is_finite(spec: dict[str, Any]) -> bool:
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
        and not all(isinstance(s, dict) and _is_finite(s) for s in params.values())
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


def load_sweep(path: str | Path, *, count: int | None = None) -> dict[str, Any]:
    """Read and validate a sweep YAML file; its `name` defaults to the file's stem.

    `count` is the --count given on the command line (random search needs a count from somewhere).
    """
    import yaml

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


# -- expanding a sweep into runs --------------------------------------------------------------------


def run_count(sweep: dict[str, Any], count: int | None = None) -> int | None:
    """How many runs: --count, else the smaller of the file's count and run_cap; None means all of a grid."""
    if count is not None:
        return count
    caps = [sweep[k] for k in ("count", "run_cap") if sweep.get(k) is not None]
    return min(caps) if caps else None


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


def local_runs(sweep: dict[str, Any], count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The parameter sets of a sweep run here: grid -> the cartesian product (first `count` of it);
    random -> `count` seeded samples, or the whole grid in a seeded order when every parameter is a
    finite list; bayes -> random, with a note (bayes needs W&B's sweep server)."""
    params = sweep["parameters"]
    n = run_count(sweep, count)
    finite = all(_is_finite(spec) for spec in params.values())

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


def varying_parameters(sweep: dict[str, Any]) -> list[str]:
    """Parameters that take more than one value in this sweep (they name the runs)."""
    return [name for name, spec in sweep["parameters"].items() if not (_is_finite(spec) and len(_choices(spec)) == 1)]


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


def run_names(sweep: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """run_name per run; a repeated name (the same sample drawn twice) gets -2, -3... in order."""
    varying, seen, names = varying_parameters(sweep), Counter(), []
    for params in runs:
        base = run_name(params, varying)
        seen[base] += 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


# -- running ----------------------------------------------------------------------------------------


def run_sweep(
    path: str | Path,
    *,
    count: int | None = None,
    mode: str | None = None,
    out_root: str | Path | None = None,
    wandb: bool = True,
    local: bool = False,
    shared_stream: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run every run of a sweep file; returns their results sorted by the sweep's metric.

    With W&B online (an API key, or mode="online") and not `local`, W&B's controller picks the runs
    and a W&B agent trains them here; otherwise they are expanded locally (see `local_runs`) and each
    logs to its own W&B run (offline without a key; none with wandb=False). Results go to
    <out root>/sweep_results.json after every run. `shared_stream` trains runs that read the same
    batches (same activations, hook, batch_size, total_tokens, seed) together with train_many.
    """
    sweep = load_sweep(path, count=count)
    if mode == "disabled":
        wandb = False
    root = Path(out_root or sweep.get("out_root") or Path("runs") / "sweeps" / sweep["name"])
    if wandb and not local and resolve_mode(mode, announce=False) == "online":
        results = _run_with_agent(sweep, root, count)
    else:
        results = _run_locally(sweep, root, count, seed, mode if wandb else "disabled", shared_stream)
    print(results_table(sweep, results))
    return results


def _finished_metrics(out: Path) -> dict[str, Any] | None:
    path = out / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _result(
    name: str,
    cfg: Any,
    params: dict[str, Any],
    status: str,
    metrics: dict[str, Any] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    entry = {"name": name, "out": cfg.out, "status": status, "params": params, "metrics": scalar_metrics(metrics or {})}
    if error is not None:
        entry["error"] = error
    return entry


def _run_locally(
    sweep: dict[str, Any], root: Path, count: int | None, seed: int, mode: str | None, shared_stream: bool
) -> list[dict[str, Any]]:
    import activations

    runs = local_runs(sweep, count, seed)
    names = run_names(sweep, runs)
    configs = [
        training.run_config_from_dict({**params, "out": str(root / name)})
        for params, name in zip(runs, names, strict=True)
    ]
    for folder in sorted(
        {c.activations for c in configs} | {c.eval_activations for c in configs if c.eval_activations}
    ):
        activations.load_cache(folder)  # a missing cache stops the sweep before any training
    results: list[dict[str, Any] | None] = [None] * len(runs)
    pending = []
    for i, cfg in enumerate(configs):
        done = _finished_metrics(Path(cfg.out))
        if done is None:
            pending.append(i)
        else:
            results[i] = _result(names[i], cfg, runs[i], "reused", done)
    print(
        f"[saewb sweep] {sweep['name']}: {len(runs)} run(s) under {root} "
        f"({len(runs) - len(pending)} already finished: their eval.json is reused)",
        file=sys.stderr,
    )
    groups = _stream_groups(pending, configs) if shared_stream else [[i] for i in pending]
    for group in groups:
        try:
            metrics = _train_group([configs[i] for i in group], [names[i] for i in group], sweep["name"], mode)
            for i, m in zip(group, metrics, strict=True):
                results[i] = _result(names[i], configs[i], runs[i], "trained", m)
        except SAEError as exc:  # a diverging lr or a bad option fails its run, not the sweep
            print(f"[saewb sweep] run(s) {', '.join(names[i] for i in group)} failed: {exc}", file=sys.stderr)
            for i in group:
                results[i] = _result(names[i], configs[i], runs[i], "failed", error=str(exc))
        write_results(root, sweep, [r for r in results if r is not None])  # after every run: progress survives a kill
    finished = [r for r in results if r is not None]
    if not groups:  # everything was reused: the file still lists the whole sweep
        write_results(root, sweep, finished)
    return sort_results(sweep, finished)


def _stream_groups(pending: list[int], configs: list[Any]) -> list[list[int]]:
    """Pending runs grouped by the batches they read (multi_train.data_side), in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i in pending:
        groups.setdefault(json.dumps(multi_train.data_side(configs[i]), sort_keys=True), []).append(i)
    return list(groups.values())


def _train_group(cfgs: list[Any], names: list[str], group: str, mode: str | None) -> list[dict[str, Any]]:
    """Train one run (train_run) or several on a shared stream (train_many), each with its W&B run."""
    with ExitStack() as stack:
        runs = []
        for cfg, name in zip(cfgs, names, strict=True):
            if mode == "disabled" or not cfg.wandb:
                runs.append(None)
                continue
            extra = {"reinit": "create_new"} if len(cfgs) > 1 else {}
            runs.append(
                stack.enter_context(
                    WandbRun(
                        project=cfg.wandb_project,
                        name=name,
                        config=dataclasses.asdict(cfg),
                        mode=mode,
                        group=group,
                        job_type="sweep",
                        **extra,
                    )
                )
            )
        log_fns = [make_log_fn(run) for run in runs]
        if len(cfgs) == 1:
            pairs = [training.train_run(cfgs[0], log_fn=log_fns[0])]
        else:
            pairs = multi_train.train_many(cfgs, log_fns)
        for run, (_, metrics) in zip(runs, pairs, strict=True):
            if run is not None:
                run.summary(metrics)
    return [metrics for _, metrics in pairs]


def _run_with_agent(sweep: dict[str, Any], root: Path, count: int | None) -> list[dict[str, Any]]:
    """Create the sweep on W&B and let an agent in this process train what the controller picks."""
    import wandb

    params = sweep["parameters"]
    project = sweep.get("project") or params.get("wandb_project", {}).get("value") or training.RunConfig.wandb_project
    n = run_count(sweep, count)
    if n is None and sweep["method"] != "grid":  # only finite parameters (validated): one run per combination
        n = len(local_runs(sweep))
    varying = varying_parameters(sweep)
    results: list[dict[str, Any]] = []

    def train_one() -> None:
        with WandbRun(project=project, group=sweep["name"], job_type="sweep", mode="online") as run:
            chosen = {k: v for k, v in run.config_values.items() if k in params}
            name = run_name(chosen, varying)
            run.run.name = name
            cfg = training.run_config_from_dict({**chosen, "out": str(root / name)})
            run.run.config.update(dataclasses.asdict(cfg), allow_val_change=True)
            metrics = _finished_metrics(Path(cfg.out))
            status = "reused" if metrics is not None else "trained"
            if metrics is None:
                _, metrics = training.train_run(cfg, log_fn=make_log_fn(run))
            run.summary(metrics)
        results.append(_result(name, cfg, chosen, status, metrics))
        write_results(root, sweep, results)

    config = {k: v for k, v in sweep.items() if k not in LOCAL_ONLY_KEYS}
    sweep_id = wandb.sweep(config, project=project, entity=sweep.get("entity"))
    print(
        f"[saewb sweep] W&B sweep {sweep_id} in project {project}: an agent here trains "
        f"{n if n is not None else 'every'} run(s) into {root}",
        file=sys.stderr,
    )
    wandb.agent(sweep_id, function=train_one, count=n, project=project, entity=sweep.get("entity"))
    return sort_results(sweep, results)


# -- results ----------------------------------------------------------------------------------------


def sort_results(sweep: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first by the sweep's metric (its goal); runs without the metric (failed) last, in run order."""
    metric = sweep.get("metric")
    if not metric:
        return list(results)
    sign = -1.0 if metric.get("goal", "minimize") == "maximize" else 1.0

    def key(entry: dict[str, Any]) -> tuple[int, float]:
        value = entry["metrics"].get(metric["name"])
        return (1, 0.0) if value is None else (0, sign * float(value))

    return sorted(results, key=key)


def write_results(root: Path, sweep: dict[str, Any], results: list[dict[str, Any]]) -> Path:
    """<root>/sweep_results.json, sorted by the metric, written atomically (temp file + rename)."""
    from activations.storage import atomic_write_json

    path = Path(root) / "sweep_results.json"
    atomic_write_json(
        path,
        {
            "sweep": sweep["name"],
            "method": sweep["method"],
            "metric": sweep.get("metric"),
            "runs": sort_results(sweep, results),
        },
    )
    return path


def results_table(sweep: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """A plain-text table of the runs, best first."""
    metric = (sweep.get("metric") or {}).get("name")
    columns = ([metric] if metric else []) + [m for m in TABLE_METRICS if m != metric]
    arrow = {"minimize": " (min)", "maximize": " (max)"}.get((sweep.get("metric") or {}).get("goal", "minimize"), "")
    header = ["#", "run"] + [c + (arrow if c == metric else "") for c in columns] + ["status"]
    rows = []
    for rank, entry in enumerate(sort_results(sweep, results), 1):
        values = [entry["metrics"].get(c) for c in columns]
        rows.append([str(rank), entry["name"]] + ["-" if v is None else f"{v:.4g}" for v in values] + [entry["status"]])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return f"sweep {sweep['name']} ({sweep['method']}, {len(rows)} run(s))\n" + "\n".join(lines)


# -- command line -----------------------------------------------------------------------------------

SWEEP_HELP = """\
A sweep file uses W&B's sweep YAML format:

  name: topk_k_grid                     # default output folder: runs/sweeps/<name>
  method: grid                          # grid | random | bayes
  metric: {name: fvu, goal: minimize}   # any eval.json number: fvu, l0, dead_frac, explained_variance...
  parameters:                           # RunConfig fields, or SAEConfig/TrainConfig fields
    activations: {value: runs/demo/cache}
    k: {values: [16, 32, 64]}
    lr: {distribution: log_uniform_values, min: 1.0e-4, max: 3.0e-3}   # random/bayes only
  count: 4                              # random/bayes: runs to draw (or run_cap:, or --count)

Distributions: uniform, q_uniform, int_uniform, log_uniform (min/max are exponents of e),
log_uniform_values, q_log_uniform_values; {values: [...]} may add probabilities: [...].

Online (an API key in $WANDB_API_KEY or from `wandb login`): the sweep is created on W&B and an
agent in this process trains the runs its controller picks (bayes needs this). Offline (no key),
or with --local / --no-wandb: the runs are expanded here (grid: every combination, in order;
random: seeded samples; bayes falls back to random), each logged to an offline W&B run under
./wandb (upload later with `wandb sync`) unless --no-wandb.

Each run trains into <out>/<run name>, named by its varying parameters (e.g. k=32). Results go to
<out>/sweep_results.json (after every run) and a table sorted by the metric. Rerunning the same
command skips runs whose folder already holds eval.json, so an interrupted sweep resumes. Exit
status 1 when some run failed (a diverging lr, a bad option); the others still finish.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `saewb sweep FILE [--count N] [--out DIR] [--no-wandb] [--local] [--shared-stream]`."""
    parser = subparsers.add_parser(
        "sweep",
        help="train a grid/random/bayes sweep of SAEs from a W&B sweep YAML file",
        description="Train one SAE per parameter set of a sweep file and rank them by its metric.",
        epilog=SWEEP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", metavar="FILE", help="sweep YAML file, e.g. experiments/sweeps/topk_k_grid.yaml")
    parser.add_argument(
        "--count",
        type=_positive_int,
        metavar="N",
        help="runs to train: random/bayes samples, or the first N of a grid "
        "(default: the file's count/run_cap; a grid runs whole)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="folder for the run folders and sweep_results.json "
        "(default: the file's out_root, else runs/sweeps/<name>)",
    )
    parser.add_argument("--no-wandb", action="store_true", help="no W&B logging at all; runs the sweep locally")
    parser.add_argument(
        "--local",
        action="store_true",
        help="expand the sweep here even with an API key (runs still log to W&B, online)",
    )
    parser.add_argument(
        "--shared-stream",
        action="store_true",
        help="locally, train runs that read the same batches (same activations, hook, batch_size, "
        "total_tokens, seed) together on one pass over the cache",
    )
    parser.add_argument(
        "--sample-seed",
        type=int,
        default=0,
        metavar="S",
        help="seed for drawing random/bayes runs locally (default: 0; keep it to resume)",
    )
    parser.set_defaults(func=cmd_sweep)
    return parser


def cmd_sweep(args: argparse.Namespace) -> int:
    results = run_sweep(
        args.file,
        count=args.count,
        out_root=args.out,
        wandb=not args.no_wandb,
        local=args.local,
        shared_stream=args.shared_stream,
        seed=args.sample_seed,
    )
    return 1 if any(entry["status"] == "failed" for entry in results) else 0
