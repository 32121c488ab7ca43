"""`saewb push`'s logic: which files of an SAE folder go to the Hub, the model card, the commit.

The first three functions are pure (files and dicts in, a list or a string out), so tests check what would be sent;
`push` is the only one that talks to the Hub: `HfApi.create_repo(exist_ok=True)`, `create_branch` for a new
--revision, then one `create_commit` with every file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import huggingface_hub
import yaml
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors

from sae.config import fields_with_role
from sae.errors import SAEConfigError, SAEDataError
from sae.hub import (
    HUB_PREFIX,
    HubName,
    check_repo_id,
    check_sae_folder,
    first_line,
    is_connection_error,
    parse_hub_name,
)
from sae.io import CFG_FILENAME, WEIGHTS_FILENAME, WORKBENCH_TENSORS_FILENAME

EVAL_FILENAME = "eval.json"
CARD_FILENAME = "README.md"
PUSHED_FILES = (CFG_FILENAME, WEIGHTS_FILENAME, WORKBENCH_TENSORS_FILENAME, EVAL_FILENAME)
"""What is uploaded from the folder when present (cfg.json and the weights must be; a workbench folder's
workbench_state.safetensors too, since sae.load needs it to restore the SAE exactly); README.md is generated."""

CARD_METRICS = ("l0", "fvu", "explained_variance", "dead_frac", "ce_loss_recovered", "delta_ce", "kl_div")
"""eval.json keys shown in the model card's metrics table, in this order, when present and numeric."""

DEFAULT_MESSAGE = "Upload SAE with sae-workbench"


def folder_files(folder: Path) -> list[Path]:
    """The files of SAE folder `folder` to upload, in PUSHED_FILES order; one SAEConfigError naming what is missing."""
    check_sae_folder(folder)
    cfg = read_json(folder / CFG_FILENAME)
    if "workbench" in cfg and not (folder / WORKBENCH_TENSORS_FILENAME).is_file():
        raise SAEConfigError(
            f"{folder} is not a complete workbench SAE folder: {WORKBENCH_TENSORS_FILENAME} is missing (cfg.json has "
            "a workbench block, and sae.load needs both to restore the SAE)."
        )
    return [folder / name for name in PUSHED_FILES if (folder / name).is_file()]


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; one SAEConfigError if it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SAEConfigError(f"{path} is not readable JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise SAEConfigError(f"{path} must hold a JSON object, found a {type(data).__name__}.")
    return data


def model_card(cfg: dict[str, Any], metrics: dict[str, Any] | None, repo_id: str, revision: str | None = None) -> str:
    """README.md for the Hub: YAML front matter (library_name, tags), then the architecture, the training config
    and the metrics from cfg.json and eval.json, and how to load it."""
    ours = cfg.get("workbench") if isinstance(cfg.get("workbench"), dict) else {}
    config = ours.get("config") or {}
    meta = cfg.get("metadata") or {}
    arch = str(config.get("arch") or cfg.get("architecture") or "unknown")
    saelens_arch = cfg.get("architecture")
    model, hook = meta.get("model_name"), meta.get("hook_name")
    front: dict[str, Any] = {
        "library_name": "sae-workbench",
        "tags": ["sparse-autoencoder", "sae-workbench", "saelens", arch.replace("_", "-")],
    }
    if isinstance(model, str) and model.count("/") == 1:  # a Hub model id, not one of our aliases
        front["base_model"] = model
    name = str(HubName(repo_id, None, revision))
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {repo_id}", ""]
    lines += [
        f"A {arch} sparse autoencoder with {config.get('n_features', cfg.get('d_sae'))} features over "
        f"{'`' + str(hook) + '`' if hook else 'its hook'} of {'`' + str(model) + '`' if model else 'its model'}, "
        "trained with sae-workbench. The folder is in SAELens' format (cfg.json + sae_weights.safetensors"
        + (f", architecture `{saelens_arch}`" if saelens_arch else "") + ").",
        "",
        "## Load it",
        "",
        "```python",
        "import sae",
        "",
        f'model = sae.load("{name}")  # cached by huggingface_hub; works offline (HF_HUB_OFFLINE=1) once cached',
        "```",
        "",
        "## Architecture",
        "",
    ]
    arch_rows = [
        ("architecture", arch + (f" (SAELens: {saelens_arch})" if saelens_arch and saelens_arch != arch else "")),
        ("d_in", config.get("d_in", cfg.get("d_in"))),
        ("n_features", config.get("n_features", cfg.get("d_sae"))),
        ("k", config.get("k", cfg.get("k"))),
        ("normalization", config.get("normalization", cfg.get("normalize_activations"))),
        ("hook", hook),
        ("model", model),
        ("dtype", cfg.get("dtype")),
    ]
    lines += _table(("field", "value"), [(k, v) for k, v in arch_rows if v is not None])
    lines += ["", "## Training", ""]
    training = ours.get("training") if isinstance(ours.get("training"), dict) else {}
    train_config = training.get("train_config") if isinstance(training.get("train_config"), dict) else {}
    kept = fields_with_role("train")  # how it trained; run-only options (checkpoints, logging) are left out
    train_rows = [(k, v) for k, v in train_config.items() if k in kept]
    train_rows += [(k, training[k]) for k in ("steps", "tokens") if k in training]
    lines += _table(("option", "value"), train_rows) if train_rows else ["No training record in cfg.json."]
    lines += ["", "## Metrics", ""]
    metric_rows = [(k, metrics[k]) for k in CARD_METRICS if metrics and _is_number(metrics.get(k))]
    if metric_rows:
        where = {True: " on its training cache (in-sample)", False: " on a held-out cache"}.get(
            metrics.get("in_sample"), "")
        lines += [f"From eval.json{where}.", ""] + _table(("metric", "value"), metric_rows)
    else:
        lines += ["No eval.json metrics."]
    return "\n".join(lines) + "\n"


def push_operations(files: list[Path], card: str) -> list[Any]:
    """One `huggingface_hub.CommitOperationAdd` per file (at the repo's root, by name), then README.md = `card`."""
    add = huggingface_hub.CommitOperationAdd
    return [add(path_in_repo=f.name, path_or_fileobj=str(f)) for f in files] + [
        add(path_in_repo=CARD_FILENAME, path_or_fileobj=card.encode())
    ]


def push(repo_id: str, operations: list[Any], *, private: bool = False, revision: str | None = None,
         message: str = DEFAULT_MESSAGE) -> str:
    """Create the repo if needed (private when asked; an existing repo keeps its visibility), the branch
    `revision` if needed, and commit `operations`; returns the commit's URL. Needs the network: offline, or on a
    connection error, one SAEDataError."""
    if hub_constants.HF_HUB_OFFLINE:
        raise SAEDataError("saewb push needs the network to reach the Hugging Face Hub, and HF_HUB_OFFLINE=1 is set: "
                           "unset it and run again (--dry-run shows what would be sent)")
    api = huggingface_hub.HfApi(library_name="sae-workbench")
    try:
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, repo_type="model", branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=message, repo_type="model", revision=revision)
    except hub_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise SAEConfigError(f"the Hub refused to write to {repo_id} (HTTP {status}): log in with "
                                 "`hf auth login` or set HF_TOKEN to a token that may write there") from None
        raise SAEDataError(f"pushing to {repo_id}: the Hub answered {first_line(exc)}") from None
    except Exception as exc:
        if is_connection_error(exc):
            raise SAEDataError(f"saewb push needs the network to reach the Hugging Face Hub and cannot reach it "
                               f"({type(exc).__name__}: {first_line(exc)})") from None
        raise
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def hub_repo(repo: str, revision: str | None) -> HubName:
    """--repo ORG/NAME and --revision checked by the hub name rules."""
    if repo.startswith(HUB_PREFIX):
        raise SAEConfigError(f"--repo takes ORG/NAME without {HUB_PREFIX}, got {repo!r}.")
    if repo.count("/") != 1:
        raise SAEConfigError(f"--repo must be ORG/NAME, got {repo!r} (pushing into a subfolder is not supported).")
    check_repo_id(repo, "--repo")
    if revision is not None and not revision:
        raise SAEConfigError("--revision is empty: name a branch, or leave it out for main.")
    return parse_hub_name(HUB_PREFIX + repo + (f"@{revision}" if revision else ""))


def _table(header: tuple[str, str], rows: list[tuple[str, Any]]) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rows]


def _cell(value: Any) -> str:
    text = repr(value) if isinstance(value, float) else value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)

