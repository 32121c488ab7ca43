"""One training run from a config: train an SAE on a cache, save it, log it, evaluate it.

A run folder holds::

    cfg.json, sae_weights.safetensors, ...   the trained SAE (sae.load(folder) reads it; SAELens too)
    run_config.json                          the RunConfig used
    train_log.jsonl                          one JSON line per logged step (loss, L0, FVU, dead fraction...)
    eval.json                                final metrics on the eval cache (or the training cache, flagged)
    checkpoints/step_*/                      resumable checkpoints
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import activations
import sae as sae_lib
from activations.storage import atomic_write_json
from experiments.evaluation import cache_metrics
from sae.config import SHARED_STREAM, TrainConfig, fields_with_role, require_nonnegative_int
from sae.distributed import default_collectives


@dataclass
class RunConfig:
    """A training run. The string under each field is its ``saewb train --help`` text."""

    activations: str = field(default="", metadata={SHARED_STREAM: True})
    "Activation cache folder written by `saewb cache`."
    arch: str = "topk"
    "Architecture: topk, mutual_choice, feature_choice or gradient_topk (g-SAE; needs a --with-grads cache)."
    n_features: int = 4608
    "Number of latents F (docs/ALGORITHMS.md recommends 16*d_in; the demo uses 4*d_in)."
    k: int = 32
    "Active latents per token (TopK, g-SAE), mean per token (Mutual-Choice), k*B/F per feature (Feature-Choice)."
    out: str = ""
    "Run folder: the SAE, run_config.json, train_log.jsonl, eval.json and checkpoints/."
    hook: str | None = field(default=None, metadata={SHARED_STREAM: True})
    "Which hook of a multi-hook cache to train on (default: its first)."
    total_tokens: int | None = None
    "Training tokens (default: one pass over the cache)."
    batch_size: int = 4096
    "Tokens per step."
    lr: float | None = None
    "Adam learning rate (default: 2e-4/sqrt(F/2^14))."
    seed: int = 0
    "Seed for the initial weights and the data order."
    eval_activations: str | None = None
    "Held-out cache for the final metrics (default: the training cache, flagged as in-sample)."
    eval_tokens: int = 65_536
    "Rows of the eval cache used for the final metrics."
    eval_offset: int = 0
    "Skip this many eval-cache rows before the metric rows (a validation slice apart from the test rows)."
    checkpoint_every: int | None = None
    "Write a resumable checkpoint every N steps (always at the end)."
    wandb: bool = True
    "Log to Weights & Biases (offline automatically when no API key is configured)."
    wandb_project: str = "sae-workbench"
    "W&B project name."
    progress: bool = True
    "Show progress bars."
    options: dict[str, Any] = field(default_factory=dict)
    "Any other SAEConfig/TrainConfig field, e.g. {aux_loss: aux_zipf, fc_capacity: zipf, grad_beta: 0.3}."

    def __post_init__(self) -> None:
        bad = sorted(set(self.options) & RESERVED)
        if bad:
            raise sae_lib.SAEConfigError(f"options {bad} are set by their own fields, not inside options")
        known = fields_with_role()
        unknown = sorted(set(self.options) - known)
        if unknown:
            raise sae_lib.SAEConfigError(f"unknown option(s) {unknown}; allowed: {sorted(known - RESERVED)}")
        if not self.activations:
            raise sae_lib.SAEConfigError("give --activations: a cache folder written by `saewb cache`")
        if not self.out:
            raise sae_lib.SAEConfigError("give --out: the folder for the trained SAE")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise sae_lib.SAEConfigError(f"--out {self.out} is an existing file; --out names a folder for the run")
        require_nonnegative_int("eval_offset", self.eval_offset)


RESERVED = (
    fields_with_role(explicit=True)
    | (fields_with_role() & {f.name for f in dataclasses.fields(RunConfig)})
    | {"checkpoint_dir"}
)
"""SAEConfig/TrainConfig fields a RunConfig never takes in `options`: build_trainer's named arguments, the ones
RunConfig sets as its own fields (checkpoint_every, progress) and checkpoint_dir (always out/checkpoints)."""


def load_run_config(path: str | Path, **overrides: Any) -> RunConfig:
    """A RunConfig from a YAML (or JSON) file; unknown keys are an error that lists the allowed ones."""
    path = Path(path)
    if not path.exists():
        raise sae_lib.SAEConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise sae_lib.SAEConfigError(f"config file {path} must hold a mapping of RunConfig fields")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return run_config_from_dict(data, source=str(path))


def run_config_from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Top-level keys are RunConfig fields; any SAEConfig/TrainConfig field may also sit at the top level."""
    own = {f.name for f in dataclasses.fields(RunConfig)}
    options = dict(data.pop("options", None) or {})
    for key in list(data):
        if key not in own:
            options[key] = data.pop(key)
    return RunConfig(**data, options=options)


class TrainLog:
    """Appends logged steps to train_log.jsonl (the dashboard plots dead fraction over training from it)."""

    def __init__(self, path: Path, forward=None):
        self.path, self.forward = path, forward
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        row = {
            "step": step,
            **{
                k: (v if isinstance(v, float) and math.isfinite(v) else None) if isinstance(v, float) else v
                for k, v in metrics.items()
            },
        }
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.forward is not None:
            self.forward(step, metrics)


def trim_log(path: Path, last_step: int) -> None:
    """On resume, drop log lines past the checkpoint we restart from (they will be logged again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def latest_checkpoint_step(folder: Path) -> int:
    steps = [int(p.name.split("_")[1]) for p in folder.glob("step_*") if p.is_dir()]
    return max(steps, default=0)


def trainer_options(cfg: RunConfig) -> dict[str, Any]:
    """The sae.train options a run folder implies: checkpoints under out/, the run's progress setting, and
    no calibration by the trainer: the run calibrates afterwards, on a better sample (calibrate_run)."""
    options = {
        **cfg.options,
        "checkpoint_dir": str(Path(cfg.out) / "checkpoints"),
        "checkpoint_every": cfg.checkpoint_every,
        "progress": cfg.progress,
    }
    options["calibration_rows"] = 0  # finish_run calibrates on a sample spread over the cache (calibrate_run)
    return options


def cache_metadata(cache, hook: str) -> dict[str, Any]:
    """SAELens metadata of an SAE trained on this cache and hook."""
    return {
        "model_name": cache.model,
        "hook_name": hook,
        "context_size": cache.manifest["context"],
        "dataset_path": cache.manifest["corpus"],
    }


def evaluate_run(model: sae_lib.SAE, cfg: RunConfig) -> dict[str, Any]:
    """Metrics on the eval cache (first ``eval_tokens`` rows), in the original activation space."""
    source = cfg.eval_activations or cfg.activations
    cache = activations.load_cache(source)
    start = min(cfg.eval_offset, cache.n_tokens)
    n = min(cfg.eval_tokens, cache.n_tokens - start)
    if n < 1:
        raise sae_lib.SAEConfigError(f"eval_offset={cfg.eval_offset} leaves no rows of {source} ({cache.n_tokens}).")
    metrics, batches = cache_metrics(model, cache, cfg.hook, n, start)
    metrics.update({"eval_source": source, "eval_rows": n, "eval_offset": start,
                    "in_sample": cfg.eval_activations is None})
    if model.calibration_rule:
        batch_mode = sae_lib.evaluate(model, batches, mode="batch")
        metrics["batch_mode"] = {k: batch_mode[k] for k in ("l0", "fvu") if k in batch_mode}
    return metrics


def open_run_data(cfg: RunConfig):
    """The cache, the hook to train on, and what sae.train should read (the cache or one hook of it)."""
    cache = activations.load_cache(cfg.activations)
    hook = cfg.hook or cache.hooks[0]
    if hook not in cache.hooks:
        raise sae_lib.SAEConfigError(f"hook {hook!r} is not in {cfg.activations}; it holds {cache.hooks}")
    return cache, hook, (cache.only(hook) if hook != cache.hooks[0] else cache)


def prepare_run(cfg: RunConfig, data: Any, cache, hook: str, log_fn=None) -> sae_lib.Trainer:
    """Lay out the run folder (config, log trimmed to the checkpoint it resumes from) and build its Trainer.

    Under data parallelism only rank 0 writes into the folder.
    """
    out = Path(cfg.out)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "run_config.json", dataclasses.asdict(cfg))
        trim_log(out / "train_log.jsonl", latest_checkpoint_step(out / "checkpoints"))
    return sae_lib.build_trainer(
        data,
        arch=cfg.arch,
        n_features=cfg.n_features,
        k=cfg.k,
        batch_size=cfg.batch_size,
        total_tokens=cfg.total_tokens,
        lr=cfg.lr,
        seed=cfg.seed,
        log_fn=TrainLog(out / "train_log.jsonl", log_fn),
        metadata=cache_metadata(cache, hook),
        **trainer_options(cfg),
    )


def calibration_rows(cfg: RunConfig) -> int:
    """How many rows a run calibrates its MC/FC thresholds on (0: keep the EMA), from its options."""
    return int(cfg.options.get("calibration_rows", TrainConfig.calibration_rows))


def calibrate_run(cfg: RunConfig, model: sae_lib.SAE, cache: activations.ActivationCache | None = None) -> None:
    """Calibrate MC/FC thresholds on whole contexts spread evenly over the training cache.

    Spread, because per-latent thresholds follow the documents of their sample: calibrated on the held-out rows
    after the metric rows (a few documents), Feature-Choice reached L0 35.3 instead of 32 on the metric rows;
    spread over the training cache, 31.9-32.0 (docs/ALGORITHMS.md §2). The metric rows stay unseen. cache: the
    training cache the run already opened (its shards checksummed once), else opened here.
    """
    count = calibration_rows(cfg) if model.calibration_rule else 0
    if not count:
        return
    cache = cache or activations.load_cache(cfg.activations)
    rows, n_contexts = cache.spread_rows(count, hook=cfg.hook)
    sae_lib.calibrate(model, rows, max_rows=count, train_batch_size=cfg.batch_size,
                      source=f"{cfg.activations}: {rows.shape[0]} rows of {n_contexts} contexts spread over the "
                             "training cache")


def finish_run(
    cfg: RunConfig, model: sae_lib.SAE, seconds: float, cache: activations.ActivationCache | None = None, **extra: Any
) -> dict[str, Any]:
    """Calibrate thresholds, save the trained SAE, evaluate it, write eval.json (atomically); `extra` goes into
    eval.json, `cache` is the training cache when the caller has it open (see calibrate_run)."""
    out = Path(cfg.out)
    calibrate_run(cfg, model, cache)
    model.save(out)
    metrics = evaluate_run(model, cfg)
    if model.training_info.get("calibration"):
        metrics["calibration"] = model.training_info["calibration"]
    tokens = model.training_info["tokens"]
    metrics.update(
        {
            "train_seconds": round(seconds, 2),
            "train_tokens": tokens,
            "train_tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
            **extra,
        }
    )
    atomic_write_json(out / "eval.json", json_safe(metrics))
    if cfg.progress:
        where = "in-sample" if metrics["in_sample"] else "held-out"
        print(
            f"[saewb train] {cfg.arch}: L0 {metrics['l0']:.1f}, FVU {metrics['fvu']:.4f}, "
            f"dead {metrics['dead_frac']:.3f} ({where}, {metrics['selection_rule']}); saved to {out}",
            file=sys.stderr,
        )
    return metrics


def train_run(cfg: RunConfig, log_fn=None) -> tuple[sae_lib.SAE, dict[str, Any]]:
    """Train, save and evaluate one SAE; returns it and its eval metrics (also written to eval.json).

    Data-parallel ranks other than 0 train and return the SAE with empty metrics: rank 0 saves and evaluates.
    """
    cache, hook, data = open_run_data(cfg)
    trainer = prepare_run(cfg, data, cache, hook, log_fn)
    started = time.perf_counter()
    model = trainer.run()
    if not trainer.coll.is_main:
        return model, {}
    extra = {"data_parallel_ranks": trainer.coll.world_size} if trainer.coll.world_size > 1 else {}
    return model, finish_run(cfg, model, time.perf_counter() - started, cache, **extra)


def is_main_process() -> bool:
    """False on data-parallel ranks other than 0 (which must not write run outputs)."""
    return default_collectives().is_main


def json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj
