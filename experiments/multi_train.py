"""One activation stream feeding several SAEs at once: every batch is read from the cache once, then
each SAE takes its optimiser step on it.

The configs must agree on the data side (activations, hook, batch_size, total_tokens, seed and the
``shuffle`` option), so the shared seeded stream is exactly the one each run would read alone; the SAE
side (arch, n_features, k, lr, any SAE/trainer option, out) may differ. Each SAE then ends bit-identical
to training it alone with `experiments.training.train_run`, in one pass over the cache instead of N.
Each run folder gets what `train_run` writes: the SAE, run_config.json, train_log.jsonl, eval.json and
checkpoints/.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sae as sae_lib
from experiments.training import (
    RunConfig,
    finish_run,
    open_run_data,
    prepare_run,
)
from sae.config import TrainConfig, shared_stream_fields
from sae.training.prefetch import batch_reader
from sae.training.streams import BatchStream, make_stream
from sae.training.tracking import LogFn, TrainLogger
from sae.training.trainer import Trainer

SHARED_KEYS = shared_stream_fields(RunConfig) + shared_stream_fields(TrainConfig)
"""What decides the batches a run reads (the fields marked shared in the configs' field table); runs trained
together must agree on all of it."""


def data_side(cfg: RunConfig, hooks: Sequence[str] | None = None) -> dict[str, Any]:
    """The SHARED_KEYS values of a run (activations as an absolute path, the hook resolved when `hooks` given):
    RunConfig's own fields, else its options, else TrainConfig's defaults."""
    side = {key: getattr(cfg, key) if hasattr(cfg, key) else cfg.options.get(key, getattr(TrainConfig, key))
            for key in SHARED_KEYS}
    side["activations"] = str(Path(cfg.activations).expanduser().resolve())
    side["hook"] = cfg.hook if cfg.hook is not None or not hooks else hooks[0]
    return side


def check_shared_stream(configs: Sequence[RunConfig], hooks: Sequence[str] | None = None) -> None:
    """Raise SAEConfigError naming the first data-side key on which the configs differ."""
    sides = [data_side(cfg, hooks) for cfg in configs]
    for key in SHARED_KEYS:
        values = [side[key] for side in sides]
        if any(v != values[0] for v in values):
            odd = next(i for i, v in enumerate(values) if v != values[0])
            raise sae_lib.SAEConfigError(
                f"runs trained on one activation stream must share {key!r}, but run 0 ({configs[0].out}) has "
                f"{values[0]!r} and run {odd} ({configs[odd].out}) has {values[odd]!r}; "
                f"shared keys: {', '.join(SHARED_KEYS)}"
            )


def train_many(
    configs: Sequence[RunConfig], log_fns: Sequence[LogFn | None] | None = None
) -> list[tuple[sae_lib.SAE, dict[str, Any]]]:
    """Train, save and evaluate several SAEs on one pass of a shared activation stream.

    Returns (sae, eval metrics) per config, in order; each run folder is laid out as `train_run`'s.
    """
    configs = list(configs)
    if not configs:
        raise sae_lib.SAEConfigError("train_many needs at least one RunConfig")
    log_fns = list(log_fns) if log_fns is not None else [None] * len(configs)
    if len(log_fns) != len(configs):
        raise sae_lib.SAEConfigError(f"got {len(log_fns)} log_fns for {len(configs)} configs")
    outs = [Path(cfg.out).expanduser().resolve() for cfg in configs]
    if len(set(outs)) != len(outs):
        clash = next(str(o) for o in outs if outs.count(o) > 1)
        raise sae_lib.SAEConfigError(f"two runs share the out folder {clash}; each SAE needs its own")
    first = configs[0]
    cache, hook, data = open_run_data(first)
    check_shared_stream(configs, cache.hooks)
    side = data_side(first)
    stream = make_stream(data, None, first.batch_size, side["shuffle"], first.seed,
                         buffer_rows=side["shuffle_buffer_rows"])
    trainers = [prepare_run(cfg, stream, cache, hook, log_fn) for cfg, log_fn in zip(configs, log_fns, strict=True)]
    started = time.perf_counter()
    train_together(trainers, stream)
    seconds = time.perf_counter() - started
    return [
        (trainer.sae, finish_run(cfg, trainer.sae, seconds, cache, shared_stream_runs=len(configs)))
        for cfg, trainer in zip(configs, trainers, strict=True)
    ]


def train_together(trainers: Sequence[Trainer], stream: BatchStream) -> None:
    """Trainer.run for several trainers in lockstep: one read of each batch, one step of every trainer on it.

    Each trainer resumes from its own checkpoints or initialises itself (that reads its first batches
    separately); resumed runs must all stand at the same step, since they share the stream position.
    """
    resumed = [trainer.resume() for trainer in trainers]
    steps = sorted({trainer.step for trainer in trainers})
    if len(steps) > 1:
        at = ", ".join(f"{t.cfg.checkpoint_dir}: step {t.step}" for t in trainers)
        raise sae_lib.SAEConfigError(
            f"cannot train these runs on one stream: their checkpoints stand at different steps ({at}); "
            "finish them separately or remove the checkpoints of the ones behind"
        )
    for trainer, done in zip(trainers, resumed, strict=True):
        if not done:
            trainer.initialize()
    first = trainers[0]
    loggers = [  # one progress bar (the first run's) for the shared loop
        TrainLogger(t.total_steps, t.step, t.cfg.batch_size, dataclasses.replace(t.cfg, progress=bar), t.log_fn)
        for t, bar in zip(trainers, [first.cfg.progress] + [False] * (len(trainers) - 1), strict=True)
    ]
    last: list[dict[str, float]] = [{} for _ in trainers]
    try:
        with batch_reader(stream, first.step, first.total_steps, first.cfg.prefetch_batches) as batches:
            for step, batch in batches:
                for i, (trainer, logger) in enumerate(zip(trainers, loggers, strict=True)):
                    last[i] = trainer.advance(step, batch, logger)
    finally:
        for logger in loggers:
            logger.close()
    for trainer, metrics in zip(trainers, last, strict=True):
        trainer.finish(metrics)
