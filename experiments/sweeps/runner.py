"""Running a sweep: locally (each run in its own folder, finished ones reused, optionally several SAEs on one
shared activation stream) or by a W&B agent when online.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import activations
from experiments import multi_train, training
from experiments.sweeps.expand import local_runs, run_name, run_names, varying_parameters
from experiments.sweeps.results import SweepResult, results_table, sort_results, write_results
from experiments.sweeps.spec import LOCAL_ONLY_KEYS, Sweep, load_sweep, run_count
from experiments.wandb_logging import WandbRun, make_log_fn, resolve_mode, scalar_metrics
from sae.devices import resolve_device
from sae.errors import SAEError


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
    device: str | None = None,
) -> list[SweepResult]:
    """Run every run of a sweep file; returns their results sorted by the sweep's metric.

    With W&B online (an API key, or mode="online") and not `local`, W&B's controller picks the runs
    and a W&B agent trains them here; otherwise they are expanded locally (see `local_runs`) and each
    logs to its own W&B run (offline without a key; none with wandb=False). Results go to
    <out root>/sweep_results.json after every run. `shared_stream` trains runs that read the same
    batches (same activations, hook, batch_size, total_tokens, seed) together with train_many. `device` (auto,
    cpu, cuda, cuda:N) overrides every run's device, the file's included.
    """
    overrides = {}
    if device is not None:
        resolve_device(device)  # a bad or absent device is one error before the sweep starts
        overrides["device"] = device
    sweep = load_sweep(path, count=count)
    if mode == "disabled":
        wandb = False
    root = Path(out_root or sweep.get("out_root") or Path("runs") / "sweeps" / sweep["name"])
    if wandb and not local and resolve_mode(mode, announce=False) == "online":
        results = _run_with_agent(sweep, root, count, overrides)
    else:
        results = _run_locally(sweep, root, count, seed, mode if wandb else "disabled", shared_stream, overrides)
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
) -> SweepResult:
    entry: SweepResult = {
        "name": name, "out": cfg.out, "status": status, "params": params, "metrics": scalar_metrics(metrics or {}),
    }
    if error is not None:
        entry["error"] = error
    return entry


def _run_locally(
    sweep: Sweep, root: Path, count: int | None, seed: int, mode: str | None, shared_stream: bool,
    overrides: dict[str, Any],
) -> list[SweepResult]:
    runs = local_runs(sweep, count, seed)
    names = run_names(sweep, runs)
    configs = [
        training.run_config_from_dict({**params, **overrides, "out": str(root / name)})
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


def _train_group(cfgs: list[Any], names: list[str], group: str, mode: str | None) -> list[SweepResult]:
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


def _run_with_agent(sweep: Sweep, root: Path, count: int | None, overrides: dict[str, Any]) -> list[SweepResult]:
    """Create the sweep on W&B and let an agent in this process train what the controller picks."""
    import wandb  # deferred: importing wandb costs ~1 s of every saewb start-up (measured in docs/ARCHITECTURE.md)

    params = sweep["parameters"]
    project = sweep.get("project") or params.get("wandb_project", {}).get("value") or training.RunConfig.wandb_project
    n = run_count(sweep, count)
    if n is None and sweep["method"] != "grid":  # only finite parameters (validated): one run per combination
        n = len(local_runs(sweep))
    varying = varying_parameters(sweep)
    results: list[SweepResult] = []

    def train_one() -> None:
        with WandbRun(project=project, group=sweep["name"], job_type="sweep", mode="online") as run:
            chosen = {k: v for k, v in run.config_values.items() if k in params}
            name = run_name(chosen, varying)
            run.run.name = name
            cfg = training.run_config_from_dict({**chosen, **overrides, "out": str(root / name)})
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
