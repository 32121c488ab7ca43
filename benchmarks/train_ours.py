"""One benchmark training run of sae-workbench (product venv); prints one JSON line (see bench_protocol).

Runs the real `sae.build_trainer(...).run()` on the exported rows in their exported order
(shuffle=False) with a constant learning rate (warmup_steps=0, decay_fraction=0) and Adam eps 1e-8
(torch's default, which both peers use). `Trainer.initialize` (scalar normalisation estimate +
geometric-median b_pre) is timed apart as init_s; the loop is timed from per-step log_fn marks.
"""

from __future__ import annotations

import dataclasses
import time
from importlib.metadata import version

import torch
from bench_protocol import StepClock, emit, load_data, parse_options, peak_gpu_mb, peak_rss_mb, runner_args

import sae

INFERENCE_RULES = {
    "topk": "per-token top-k",
    "mutual_choice": "JumpReLU, one learned threshold (EMA of the smallest selected value)",
    "feature_choice": "JumpReLU, per-feature learned thresholds (EMA of each latent's smallest selected value)",
}
REPORTED_SETTINGS = ("lr", "adam_beta1", "adam_beta2", "adam_eps", "grad_clip", "aux_loss", "aux_coef", "k_aux",
                     "dead_tokens", "norm_estimation_batches", "geometric_median_rows", "sparse_kernels")


def main() -> None:
    args = runner_args(__doc__)
    train, heldout = load_data(args.data, args.steps, args.batch_size, args.device)
    clock = StepClock(args.device)
    options = {
        "shuffle": False,
        "progress": False,
        "warmup_steps": 0,
        "decay_fraction": 0.0,
        "adam_eps": 1e-8,
        "log_every": 1,
        "dead_tokens": args.dead_tokens,
        "device": args.device,
        **parse_options(args.option),
    }
    trainer = sae.build_trainer(
        train,
        arch=args.arch,
        n_features=args.n_features,
        k=args.k,
        batch_size=args.batch_size,
        total_tokens=args.steps * args.batch_size,
        lr=args.lr,
        seed=args.seed,
        log_fn=clock.mark,
        **options,
    )
    initialize = trainer.initialize
    init_s = 0.0

    def timed_initialize() -> None:
        nonlocal init_s
        began = time.perf_counter()
        initialize()
        init_s = time.perf_counter() - began
        clock.start()

    trainer.initialize = timed_initialize  # type: ignore[method-assign]
    rss_before = peak_rss_mb()
    began = time.perf_counter()
    model = trainer.run()
    total_s = time.perf_counter() - began
    rss, gpu_mb = peak_rss_mb(), peak_gpu_mb(args.device)
    if clock.started is None:
        raise SystemExit("Trainer.run() did not call initialize(): update train_ours.py's init timing")
    if len(clock.marks) != args.steps:
        raise SystemExit(f"expected {args.steps} step marks from log_fn, got {len(clock.marks)}")

    model.eval()

    def reconstruct(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = model.encode(x)
        return model.decode(z, x), (z > 0).sum(dim=1)

    def reconstruct_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = model.encode_batch(x)  # the training rule on held-out batches of B
        return model.decode(z, x), (z > 0).sum(dim=1)

    settings = dataclasses.asdict(trainer.cfg)
    settings["norm_estimation_batches"] = min(settings["norm_estimation_batches"], args.steps)  # as initialize()
    emit(
        args,
        "ours",
        version("sae-workbench"),
        clock,
        heldout,
        reconstruct,
        reconstruct_batch if args.arch in ("mutual_choice", "feature_choice") else None,
        init_s=init_s,
        total_s=total_s,
        peak_rss_mb=rss,
        peak_gpu_mb=gpu_mb,
        rss_before_training_mb=rss_before,
        inference_rule=INFERENCE_RULES.get(args.arch, "the architecture's encode()"),
        settings={key: settings[key] for key in REPORTED_SETTINGS if key in settings},
    )


if __name__ == "__main__":
    main()
