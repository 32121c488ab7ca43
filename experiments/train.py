"""``python -m experiments.train --config experiments/configs/NAME.yaml``: one training run from a YAML file.

Under ``torchrun --nproc-per-node N -m experiments.train ...`` the run is data-parallel over N ranks
(gloo on CPU, NCCL when CUDA is available): each rank reads its own share of the cache, and rank 0
alone writes checkpoints, the log, W&B, the SAE and eval.json (see sae/distributed.py).
"""

from __future__ import annotations

import argparse
import sys

from experiments.cli.train import train_with_logging
from experiments.data_parallel import leave_rank, process_group
from experiments.training import load_run_config
from experiments.user_errors import run_user_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.train",
        description="Train one SAE from a YAML RunConfig (see experiments/configs/). Keys are RunConfig fields "
        "(activations, arch, n_features, k, out, total_tokens, batch_size, lr, seed, eval_activations, wandb...) "
        "or any SAEConfig/TrainConfig field (aux_loss, fc_capacity, grad_beta, ...). Data-parallel: "
        "`torchrun --nproc-per-node N -m experiments.train --config ...` (batch_size is the global batch, "
        "a multiple of N; each rank reads its own share of the cache; rank 0 writes every output). "
        "Multi-node: add torchrun's --nnodes, --node-rank and --rdzv-backend c10d --rdzv-endpoint HOST:PORT, "
        "with the cache and out folder on storage every node sees.",
    )
    parser.add_argument("--config", required=True, help="YAML file")
    parser.add_argument("--out", help="override the config's out folder")
    parser.add_argument("--activations", help="override the config's activation cache")
    parser.add_argument("--no-wandb", dest="wandb", action="store_const", const=False, help="no W&B run")
    args = parser.parse_args(argv)

    def run() -> int:
        cfg = load_run_config(args.config, out=args.out, activations=args.activations, wandb=args.wandb)
        with process_group():
            return train_with_logging(cfg)

    return leave_rank(run_user_command("train", run))


if __name__ == "__main__":
    sys.exit(main())
