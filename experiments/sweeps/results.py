"""A sweep's results: ordered by its metric, written to results.json atomically, and printed as a table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

from activations.storage import atomic_write_json
from experiments.sweeps.spec import Sweep

TABLE_METRICS = ("l0", "fvu", "explained_variance", "dead_frac", "dense_frac")


class SweepResult(TypedDict, total=False):
    """One run of a sweep, as results.json lists it."""

    name: str  # the run's folder name under out_root, from the parameters that vary
    out: str  # its run folder
    status: str  # "trained", "reused" (a finished run folder) or "failed"
    params: dict[str, Any]  # the parameter values it ran with
    metrics: dict[str, float]  # its eval.json numbers (empty when it failed)
    error: str  # only when it failed: the one-line reason


def sort_results(sweep: Sweep, results: list[SweepResult]) -> list[SweepResult]:
    """Best first by the sweep's metric (its goal); runs without the metric (failed) last, in run order."""
    metric = sweep.get("metric")
    if not metric:
        return list(results)
    sign = -1.0 if metric.get("goal", "minimize") == "maximize" else 1.0

    def key(entry: SweepResult) -> tuple[int, float]:
        value = entry["metrics"].get(metric["name"])
        return (1, 0.0) if value is None else (0, sign * float(value))

    return sorted(results, key=key)


def write_results(root: Path, sweep: Sweep, results: list[SweepResult]) -> Path:
    """<root>/sweep_results.json, sorted by the metric, written atomically (temp file + rename)."""
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


def results_table(sweep: Sweep, results: list[SweepResult]) -> str:
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
