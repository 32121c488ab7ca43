"""One benchmark training run of sparsify (.venv-bench, eager CPU path); prints one JSON line.

sparsify's `Trainer` needs a transformers model to hook, so this loop mirrors its step as written
in eai-sparsify 1.3.3's sparsify/trainer.py (`fit` and its forward hook), with loss_fn="fvu",
grad_acc_steps = micro_acc_steps = 1, one SAE:
  step 0: b_dec <- mean of the batch (the hook's first-step init; it falls in the untimed warm-up);
  every step: set_decoder_norm_to_unit_norm(); out = SparseCoder(x, dead_mask=...);
  loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8; backward;
  remove_gradient_parallel_to_decoder_directions(); Adam step; zero_grad; then the dead-latent
  counters (tokens since fired += B, reset where a latent was among the top-k).
Like the real trainer there is no gradient clipping. Differences from its defaults, to align with
the other frameworks: optimizer "adam" (torch Adam; its default is signum) at the same constant lr
(its Adam path warms up over 1000 steps and decays linearly), and auxk_alpha = 1/32 with the same
dead-token window (its default is auxk_alpha 0, no aux loss). Inference: encode (per-token top-k)
then decode, as SparseCoder.forward does.
"""

from __future__ import annotations

import argparse
import os

# before importing sparsify: its Triton decoder on CUDA, the eager one on CPU (where Triton does not run)
_device = argparse.ArgumentParser(add_help=False)
_device.add_argument("--device", default="cpu")
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1" if _device.parse_known_args()[0].device == "cpu" else "0")

import time  # noqa: E402
from importlib.metadata import version  # noqa: E402

import torch  # noqa: E402
from bench_protocol import (  # noqa: E402
    StepClock,
    batches,
    emit,
    load_data,
    parse_options,
    peak_gpu_mb,
    peak_rss_mb,
    runner_args,
)
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

AUXK_ALPHA = 1 / 32


def main() -> None:
    args = runner_args(__doc__)
    if args.arch != "topk":
        raise SystemExit(f"sparsify trains TopK only (activation='topk'), got arch {args.arch!r}")
    train, heldout = load_data(args.data, args.steps, args.batch_size, args.device)
    train_batches = batches(train, args.batch_size)
    options = parse_options(args.option)
    auxk_alpha = float(options.pop("auxk_alpha", AUXK_ALPHA))
    torch.manual_seed(args.seed)  # as Trainer.__init__ does per init seed
    coder = SparseCoder(
        train.shape[1], SparseCoderConfig(num_latents=args.n_features, k=args.k, **options), args.device,
        dtype=torch.float32,
    )
    optimizer = torch.optim.Adam(coder.parameters(), lr=args.lr)
    tokens_since_fired = torch.zeros(args.n_features, dtype=torch.long, device=args.device)
    clock = StepClock(args.device)
    rss_before = peak_rss_mb()
    began = time.perf_counter()
    clock.start()
    for step, x in enumerate(train_batches):
        if step == 0:
            coder.b_dec.data = x.mean(0).to(coder.dtype)
        coder.set_decoder_norm_to_unit_norm()
        dead_mask = tokens_since_fired > args.dead_tokens if auxk_alpha > 0 else None
        out = coder(x, dead_mask=dead_mask)
        did_fire = torch.zeros(args.n_features, dtype=torch.bool, device=args.device)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            tokens_since_fired += x.shape[0]
            tokens_since_fired[did_fire] = 0
        clock.mark()
    total_s = time.perf_counter() - began
    rss, gpu_mb = peak_rss_mb(), peak_gpu_mb(args.device)

    def reconstruct(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top_acts, top_indices, _ = coder.encode(x)
        return coder.decode(top_acts, top_indices), (top_acts > 0).sum(dim=1)

    emit(
        args,
        "sparsify",
        version("eai-sparsify"),
        clock,
        heldout,
        reconstruct,
        init_s=0.0,
        total_s=total_s,
        peak_rss_mb=rss,
        peak_gpu_mb=gpu_mb,
        rss_before_training_mb=rss_before,
        inference_rule="per-token top-k (SparseCoder.encode + decode)",
        settings={
            "lr": args.lr,
            "optimizer": "torch Adam (betas 0.9, 0.999; eps 1e-8)",
            "grad_clip": None,
            "auxk_alpha": auxk_alpha,
            "dead_feature_threshold_tokens": args.dead_tokens,
            "decoder_impl": "eager" if os.environ.get("SPARSIFY_DISABLE_TRITON") == "1" else "triton",
        },
    )


if __name__ == "__main__":
    main()
