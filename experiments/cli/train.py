"""`saewb train`: one SAE from flags or a YAML RunConfig (also the body of `python -m experiments.train`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from experiments.arguments import add_dataclass_arguments, dataclass_from_args
from experiments.data_parallel import process_group
from experiments.training import RESERVED, RunConfig, is_main_process, load_run_config, train_run
from experiments.wandb_logging import WandbRun, make_log_fn
from sae.config import SAEConfig, TrainConfig, fields_with_role


def _train_parser_options(parser: argparse.ArgumentParser) -> None:
    """RunConfig fields, then every SAEConfig/TrainConfig field not already covered, as --flags."""
    add_dataclass_arguments(parser, RunConfig, skip=("options",))
    advanced = parser.add_argument_group(
        "SAE and trainer options (see docs/ALGORITHMS.md; 'our choice' marks design choices)"
    )
    for cls in (SAEConfig, TrainConfig):
        add_dataclass_arguments(advanced, cls, skip=tuple(RESERVED), defaults=_none_defaults(cls))


def _none_defaults(cls) -> dict:
    """Advanced options default to None on the command line so only the ones given override the config."""
    return {f.name: None for f in dataclasses.fields(cls)}


def _collect_options(args: argparse.Namespace) -> dict:
    names = fields_with_role() - RESERVED
    return {n: getattr(args, n) for n in sorted(names) if getattr(args, n, None) is not None}


def run(args: argparse.Namespace) -> int:
    if args.config:
        cfg = load_run_config(args.config)
    else:
        cfg = dataclass_from_args(RunConfig, args, options=_collect_options(args))
    with process_group():
        return train_with_logging(cfg)


def train_with_logging(cfg) -> int:
    """Train one run; rank 0 logs it (W&B when asked) and prints the headline metrics as JSON."""
    if not is_main_process():  # a data-parallel rank other than 0: train only, rank 0 reports
        train_run(cfg)
        return 0
    if cfg.wandb:
        with WandbRun(project=cfg.wandb_project, name=Path(cfg.out).name, config=dataclasses.asdict(cfg)) as run:
            _, metrics = train_run(cfg, log_fn=make_log_fn(run))
            run.summary(metrics)
    else:
        _, metrics = train_run(cfg)
    print(json.dumps(_headline(metrics)))
    return 0


def _headline(metrics: dict) -> dict:
    keys = ("l0", "fvu", "explained_variance", "dead_frac", "dense_frac", "train_tokens", "train_tokens_per_s")
    return {k: metrics[k] for k in keys if k in metrics}


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "train",
        help="train one SAE on an activation cache",
        description="Train a TopK / Mutual-Choice / Feature-Choice / g-SAE on a cache written by `saewb cache`. "
        "The run folder (--out) gets the SAE (loadable by sae.load and SAELens), run_config.json, "
        "train_log.jsonl, eval.json and resumable checkpoints: rerunning the same command resumes. "
        "W&B logging is on by default and goes offline by itself when no API key is configured.",
    )
    parser.add_argument("--config", help="a YAML RunConfig (experiments/configs/*.yaml); other flags are ignored")
    _train_parser_options(parser)
    parser.set_defaults(func=run)
