"""`saewb push`: upload an SAE folder to the Hugging Face Hub with a generated model card."""

from __future__ import annotations

import argparse
from pathlib import Path

import sae
from experiments.hub_push import (
    CARD_FILENAME,
    DEFAULT_MESSAGE,
    EVAL_FILENAME,
    folder_files,
    hub_repo,
    model_card,
    push,
    push_operations,
    read_json,
)
from sae.hub import hub_name_of
from sae.io import CFG_FILENAME


def run(args: argparse.Namespace) -> int:
    if hub_name_of(args.sae) is not None:
        raise sae.SAEConfigError(f"--sae {args.sae} is a hub name; saewb push uploads a local SAE folder.")
    folder = Path(args.sae)
    target = hub_repo(args.repo, args.revision)
    files = folder_files(folder)
    sae.load(folder)  # what is published must load: every check sae.load makes, before anything is sent
    metrics = read_json(folder / EVAL_FILENAME) if (folder / EVAL_FILENAME).is_file() else None
    card = model_card(read_json(folder / CFG_FILENAME), metrics, target.repo_id, target.revision)
    operations = push_operations(files, card)
    branch = target.revision or "main"
    if args.dry_run:
        print(f"saewb push --dry-run: would commit to https://huggingface.co/{target.repo_id} (branch {branch}"
              f"{', a new repo private' if args.private else ''}):")
        for f in files:
            print(f"  {f.name:<30} {f.stat().st_size:>12} bytes")
        print(f"  {CARD_FILENAME:<30} {len(card.encode()):>12} bytes (generated)")
        print(f"--- {CARD_FILENAME} ---")
        print(card, end="")
        return 0
    url = push(target.repo_id, operations, private=args.private, revision=target.revision, message=args.message)
    print(f"pushed {', '.join(op.path_in_repo for op in operations)} to {target.repo_id} ({branch}): {url}")
    print(f'load it with sae.load("{target}")')
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "push",
        help="upload an SAE folder to the Hugging Face Hub, with a generated model card",
        description="Upload an SAE folder's cfg.json, sae_weights.safetensors, workbench_state.safetensors and "
        "eval.json (those present) and a generated README.md model card (architecture, training config, eval "
        "metrics, how to load it) as one commit to the model repo --repo, created if it does not exist. Anyone "
        "can then load it with sae.load(\"hf://ORG/NAME\") or pass --sae hf://ORG/NAME to eval, analyze, steer "
        "and unlearn. Needs the network and a token that may write there (`hf auth login` or HF_TOKEN).",
    )
    parser.add_argument("--sae", required=True, help="local SAE folder (as written by `saewb train`)")
    parser.add_argument("--repo", required=True, help="model repo to push to, ORG/NAME")
    parser.add_argument("--private", action="store_true",
                        help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--revision", help="branch to commit to, created from main if new (default: main)")
    parser.add_argument("--message", default=DEFAULT_MESSAGE, help=f"commit message (default: {DEFAULT_MESSAGE!r})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the files and the model card without sending anything")
    parser.set_defaults(func=run)
