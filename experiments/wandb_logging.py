"""Weights & Biases logging for training runs: online with an API key, offline (``wandb sync`` later) without.

``WandbRun`` wraps one ``wandb.init`` run; ``make_log_fn`` turns it into the ``log_fn`` that
``experiments.training.train_run`` forwards every logged step to. Training steps go to the history as
``train/<name>``; the final eval metrics go to the run summary under their own names (``fvu``, ``l0``...),
which is where a sweep's ``metric: {name: fvu}`` is read from.
"""

from __future__ import annotations

import math
import netrc
import numbers
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from sae.errors import SAEConfigError

MODES = ("online", "offline", "disabled")
DEFAULT_HOST = "https://api.wandb.ai"
DENSITY_FLOOR = 1e-10
"""Added to feature densities before log10, so dead latents land at -10 instead of -inf."""
MAX_HISTOGRAM_BINS = 512
"""wandb.Histogram refuses more bins than this."""

LogFn = Callable[[int, dict[str, Any]], None]


def _mode_error(message: str) -> Exception:

    return SAEConfigError(message)


def api_key_source() -> str | None:
    """Where a W&B credential is configured ($WANDB_API_KEY, an identity token file, or a netrc entry), or None.

    Reads the environment and the netrc file only: nothing is sent anywhere.
    """
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(var):
            return "$" + var
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST).netloc
    path = _netrc_path()
    if path is None or not host:
        return None
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return str(path) if entry and entry[2] else None


def _netrc_path() -> Path | None:
    """The netrc file wandb reads: $NETRC, else ~/.netrc, else ~/_netrc."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    for name in ("~/.netrc", "~/_netrc"):
        path = Path(name).expanduser()
        if path.exists():
            return path
    return None


def resolve_mode(requested: str | None = None, *, announce: bool = True) -> str:
    """The W&B mode to use: `requested`, else $WANDB_MODE, else online with an API key and offline without.

    On the offline fallback (no mode asked for, no key) one line on stderr says so when `announce`;
    `WandbRun` announces it itself after init, naming the run folder to `wandb sync`.
    """
    for value, source in ((requested, "mode"), (os.environ.get("WANDB_MODE"), "$WANDB_MODE")):
        if value:
            mode = {"dryrun": "offline", "run": "online"}.get(value, value)
            if mode not in MODES:
                raise _mode_error(f"unknown W&B {source} {value!r}; allowed: {', '.join(MODES)}")
            return mode
    if api_key_source() is not None:
        return "online"
    if announce:
        print(offline_note(None), file=sys.stderr)
    return "offline"


def offline_note(run_dir: str | Path | None) -> str:
    """The one-line notice printed when W&B falls back to offline for lack of an API key."""
    if run_dir is not None:
        root, target = Path(run_dir).parent, run_dir
    else:
        root, target = Path(os.environ.get("WANDB_DIR") or ".") / "wandb", "<that folder>/offline-run-<time>-<id>"
    return (
        "[saewb] wandb: no API key configured ($WANDB_API_KEY or `wandb login`), so runs are stored offline "
        f"under {root}; upload later with `wandb sync {target}`"
    )


class WandbRun:
    """One W&B run as a context manager; on an exception the run is finished as failed (exit code 1).

    Extra keyword arguments (group, tags, job_type, reinit...) go to ``wandb.init`` unchanged.
    """

    def __init__(
        self,
        project: str = "sae-workbench",
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        *,
        mode: str | None = None,
        dir: str | Path | None = None,
        **init_kwargs: Any,
    ) -> None:
        self.project, self.name, self.config = project, name, dict(config or {})
        self.requested_mode, self.dir, self.init_kwargs = mode, dir, init_kwargs
        self.mode: str | None = None
        self.run: Any = None

    def __enter__(self) -> WandbRun:
        import wandb  # deferred: ~1 s of every saewb start-up (docs/ARCHITECTURE.md)

        self.mode = resolve_mode(self.requested_mode, announce=False)
        fallback = self.mode == "offline" and not (self.requested_mode or os.environ.get("WANDB_MODE"))
        kwargs = dict(self.init_kwargs)
        if self.dir is not None:
            Path(self.dir).mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(self.dir)
        self.run = wandb.init(project=self.project, name=self.name, config=self.config, mode=self.mode, **kwargs)
        if fallback:
            print(offline_note(self.run_dir), file=sys.stderr)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if exc_type is not None else 0)
            self.run = None

    @property
    def run_dir(self) -> str | None:
        """The run's local folder (what `wandb sync` takes); None when W&B is disabled."""
        if self.run is None or self.mode == "disabled":
            return None
        sync_dir = getattr(getattr(self.run, "settings", None), "sync_dir", None)
        if sync_dir:
            return str(sync_dir)
        files = getattr(self.run, "dir", None)
        return str(Path(files).parent) if files else None

    @property
    def config_values(self) -> dict[str, Any]:
        """The run's config as W&B holds it (under a sweep agent: the sampled parameters)."""
        return dict(self.run.config) if self.run is not None else {}

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "train/") -> None:
        """Log one step: finite scalars, plus histograms for a density tensor and a per-token L0 histogram."""
        data: dict[str, Any] = {prefix + k: v for k, v in scalar_metrics(metrics).items()}
        data.update({prefix + k: v for k, v in histograms(metrics).items()})
        if data:
            self.run.log(data, step=step)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Final (eval) metrics into the run summary: scalars under their names, tensors as histograms."""
        self.run.summary.update({**scalar_metrics(metrics), **histograms(metrics)})


def make_log_fn(run: WandbRun | None) -> LogFn | None:
    """A `log_fn(step, metrics)` for `train_run`/`sae.train` that logs to `run` (None gives None)."""
    if run is None:
        return None

    def log_fn(step: int, metrics: dict[str, Any]) -> None:
        run.log(step, metrics)

    return log_fn


def scalar_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float | int | bool]:
    """Finite numbers (and 0-d tensors) of `metrics`; nested dicts flattened as ``outer/inner``.

    Tensors with several values, lists and strings are left out, and so is a not-yet-learned threshold (inf).
    """
    out: dict[str, float | int | bool] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            out.update(scalar_metrics(value, f"{prefix}{key}/"))
            continue
        if hasattr(value, "dim") and value.dim() == 0:
            value = value.item()
        if isinstance(value, numbers.Real) and (isinstance(value, bool) or math.isfinite(value)):
            out[prefix + key] = value
    return out


def histograms(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """`wandb.Histogram`s of what `metrics` holds: log10(density + 1e-10) per latent, and tokens per L0 value.

    The density comes from the per-latent ``density`` tensor, or else from a precomputed
    ``density_histogram`` (``{"edges", "counts"}``, as `sae.evaluate` returns and eval.json stores).
    """
    import wandb  # deferred: ~1 s of every saewb start-up (docs/ARCHITECTURE.md)

    out: dict[str, Any] = {}
    density = metrics.get("density")
    if density is not None and hasattr(density, "numel") and density.numel() > 1:
        values = np.log10(np.asarray(density.detach().cpu().double()) + DENSITY_FLOOR)
        out["density_log10"] = wandb.Histogram(values, num_bins=64)
    elif isinstance(metrics.get("density_histogram"), Mapping):
        hist = metrics["density_histogram"]
        out["density_log10"] = wandb.Histogram(np_histogram=(list(hist["counts"]), list(hist["edges"])))
    l0_counts = metrics.get("l0_histogram")
    if l0_counts is not None and len(l0_counts) > 0:
        counts, edges = l0_histogram_bins(np.asarray(l0_counts.cpu() if hasattr(l0_counts, "cpu") else l0_counts))
        out["l0_histogram"] = wandb.Histogram(np_histogram=(counts.tolist(), edges.tolist()))
    return out


def l0_histogram_bins(counts, max_bins: int = MAX_HISTOGRAM_BINS):
    """Tokens per L0 value [F+1] -> (counts, edges) up to the largest L0 seen, merged to at most `max_bins`.

    Bin i covers L0 values [edges[i], edges[i+1]); edges sit at half-integers so each holds whole L0 values.
    """

    counts = np.asarray(counts, dtype=np.int64)
    nonzero = np.flatnonzero(counts)
    counts = counts[: (nonzero[-1] + 1) if nonzero.size else 1]
    width = -(-counts.size // max_bins)
    if width > 1:
        counts = np.pad(counts, (0, (-counts.size) % width)).reshape(-1, width).sum(axis=1)
    edges = np.arange(counts.size + 1) * width - 0.5
    return counts, edges
