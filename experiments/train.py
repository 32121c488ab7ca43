"""``python -m experiments.train --config experiments/configs/NAME.yaml``: one training run from a YAML file."""

from __future__ import annotations

import argparse
import sys

from experiments.cli import run_user_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.train",
        description="Train one SAE from a YAML RunConfig (see experiments/configs/). Keys are RunConfig fields "
        "(activations, arch, n_features, k, out, total_tokens, batch_size, lr, seed, eval_activations, wandb...) "
        "or any SAEConfig/TrainConfig field (aux_loss, fc_capacity, grad_beta, ...).",
    )
    parser.add_argument("--config", required=True, help="YAML file")
    parser.add_argument("--out", help="override the config's out folder")
    parser.add_argument("--activations", help="override the config's activation cache")
    parser.add_argument("--no-wandb", dest="wandb", action="store_const", const=False, help="no W&B run")
    args = parser.parse_args(argv)

    def run() -> int:
        from experiments.cli import train_with_logging
        from experiments.training import load_run_config

        cfg = load_run_config(args.config, out=args.out, activations=args.activations, wandb=args.wandb)
        return train_with_logging(cfg)

    return run_user_command("train", run)


if __name__ == "__main__":
    sys.exit(main())
