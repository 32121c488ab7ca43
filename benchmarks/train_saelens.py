"""One benchmark training run of SAELens (.venv-bench); prints one JSON line (see bench_protocol).

Trains with SAELens' own `SAETrainer.fit()` (the step its users get: training_forward_pass,
backward, clip_grad_norm 1.0, Adam, constant LR scheduler) on a data provider that yields the
exported batches in order. Architectures: "topk" (TopKTrainingSAE) and "batchtopk"
(BatchTopKTrainingSAE), with SAELens' defaults except the aligned settings: lr (constant, no
warm-up/decay), Adam betas (0.9, 0.999) (eps is torch's 1e-8, not configurable),
normalize_activations="expected_average_only_in" (the same c = sqrt(d)/E||x|| as our "scalar",
estimated on the same min(1000, steps) batches; timed as init_s), and the dead-latent window for
the aux loss (--dead-tokens / batch steps). SAELens 6 starts b_dec at zero and has no option for
it; on this residual stream the mean has ~2/3 of a typical row's norm, so a short run leaves its FVU
above 1. By default (option b_dec_init=mean) b_dec is therefore set, before fit() and timed in
init_s, to the scaled mean of the first batch, sparsify's rule; b_dec_init=zeros keeps SAELens'
own init. Inference: the SAE written by `save_inference_model`
and reloaded with `SAE.load_from_disk` (TopK -> TopKSAE; BatchTopK -> JumpReLUSAE whose threshold
is the trained topk_threshold), so FVU uses exactly what a SAELens user would load.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch
from bench_protocol import StepClock, batches, emit, load_data, parse_options, peak_gpu_mb, peak_rss_mb, runner_args
from sae_lens import (
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    LoggingConfig,
    SAETrainer,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    __version__,
)
from sae_lens.config import SAETrainerConfig

ARCHS = {
    "topk": (TopKTrainingSAE, TopKTrainingSAEConfig, "per-token top-k (TopKSAE)"),
    "batchtopk": (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        "JumpReLU, one threshold = trained topk_threshold (EMA of the smallest selected value, lr 0.01)",
    ),
}


class TimedSAETrainer(SAETrainer):
    """SAELens' trainer with a clock mark after each step (`step` is its public per-step seam)."""

    clock: StepClock

    def step(self, batch: torch.Tensor) -> Any:
        output = super().step(batch)
        self.clock.mark()
        return output


def timed_batches(train_batches: list[torch.Tensor], clock: StepClock) -> Iterator[torch.Tensor]:
    """Every batch once, in order; the clock starts when fit() asks for the first one."""
    clock.start()
    yield from train_batches


def main() -> None:
    args = runner_args(__doc__)
    if args.arch not in ARCHS:
        raise SystemExit(f"SAELens runner knows archs {sorted(ARCHS)}, got {args.arch!r}")
    sae_cls, cfg_cls, rule = ARCHS[args.arch]
    train, heldout = load_data(args.data, args.steps, args.batch_size, args.device)
    train_batches = batches(train, args.batch_size)
    options = parse_options(args.option)
    b_dec_init = options.pop("b_dec_init", "mean")
    if b_dec_init not in ("mean", "zeros"):
        raise SystemExit(f"b_dec_init must be mean or zeros, got {b_dec_init!r}")
    torch.manual_seed(args.seed)
    sae_cfg = cfg_cls(
        d_in=train.shape[1],
        d_sae=args.n_features,
        k=args.k,
        dtype="float32",
        device=args.device,
        normalize_activations="expected_average_only_in",
        **options,
    )
    model = sae_cls(sae_cfg)
    norm_batches = min(1000, args.steps)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch_size,
        train_batch_size_samples=args.batch_size,
        lr=args.lr,
        lr_end=args.lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        lr_decay_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        device=args.device,
        dead_feature_window=max(1, args.dead_tokens // args.batch_size),
        n_batches_for_norm_estimate=norm_batches,
        logger=LoggingConfig(log_to_wandb=False),
    )
    clock = StepClock(args.device)
    trainer = TimedSAETrainer(trainer_cfg, model, timed_batches(train_batches, clock))
    trainer.clock = clock
    rss_before = peak_rss_mb()
    began = time.perf_counter()
    # What fit() does first (it skips its own estimate when the factor is set), done here so b_dec can
    # be initialised in the scaled space the SAE trains in.
    trainer.activation_scaler.estimate_scaling_factor(
        d_in=sae_cfg.d_in, data_provider=iter(train_batches[:norm_batches]), n_batches_for_norm_estimate=norm_batches
    )
    if b_dec_init == "mean":
        with torch.no_grad():
            model.b_dec.copy_(trainer.activation_scaler(train_batches[0]).mean(dim=0))
    trained = trainer.fit()
    total_s = time.perf_counter() - began
    rss, gpu_mb = peak_rss_mb(), peak_gpu_mb(args.device)
    assert clock.started is not None
    init_s = clock.started - began

    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(tmp)
        inference = SAE.load_from_disk(tmp, device=args.device)
    inference.eval()

    def reconstruct(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = inference.encode(x)
        return inference.decode(z), (z > 0).sum(dim=1)

    def reconstruct_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = trained.encode(trainer.activation_scaler.scale(x))  # top k*B of each held-out batch of B
        return trainer.activation_scaler.unscale(trained.decode(z)), (z > 0).sum(dim=1)

    emit(
        args,
        "saelens",
        __version__,
        clock,
        heldout,
        reconstruct,
        reconstruct_batch if args.arch == "batchtopk" else None,
        init_s=init_s,
        total_s=total_s,
        peak_rss_mb=rss,
        peak_gpu_mb=gpu_mb,
        rss_before_training_mb=rss_before,
        inference_rule=rule,
        inference_class=type(inference).__name__,
        settings={
            "lr": args.lr,
            "adam_betas": [0.9, 0.999],
            "adam_eps": 1e-8,
            "grad_clip": 1.0,
            "normalize_activations": "expected_average_only_in",
            "norm_estimation_batches": norm_batches,
            "b_dec_init": b_dec_init,
            "dead_feature_window_steps": trainer_cfg.dead_feature_window,
            "aux_loss_coefficient": sae_cfg.aux_loss_coefficient,
            "rescale_acts_by_decoder_norm": sae_cfg.rescale_acts_by_decoder_norm,
            "decoder_init_norm": sae_cfg.decoder_init_norm,
        },
    )


if __name__ == "__main__":
    main()
