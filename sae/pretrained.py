"""SAELens' pretrained SAEs by name: `sae.load("RELEASE/SAE_ID")`, e.g. "gpt2-small-res-jb/blocks.8.hook_resid_pre"
or "gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical".

The names are those of SAELens' registry, the `pretrained_saes.yaml` its package ships: when sae_lens is installed
the file is read (with yaml, without importing sae_lens, which would pull in transformer_lens) to find the
release's Hub repo and the SAE's folder in it. The folder comes through sae/hub.py (the Hugging Face cache,
offline once cached) and loads as any SAELens folder. Releases stored in another format need a conversion; the
one done here is Gemma Scope's (`conversion_func: gemma_2`, a `params.npz` of a JumpReLU SAE), converted once into
a SAELens jumprelu folder under `$SAEWB_CACHE/pretrained/`. Other conversions are refused, naming them.

A local folder of the same relative path wins: the registry is consulted only for a path that does not exist.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from activations.storage import atomic_folder, cache_root
from sae.errors import SAEConfigError
from sae.hub import HUB_PREFIX, HubName, download_folder, download_sae_folder
from sae.io import CFG_FILENAME, WEIGHTS_FILENAME

REGISTRY_FILE = "pretrained_saes.yaml"
CONVERSIONS = (None, "gemma_2")
"""conversion_func values of the registry that load here: none (a SAELens folder) and Gemma Scope's params.npz."""
GEMMA_SCOPE_HOOKS = {"res": "blocks.{layer}.hook_resid_post", "mlp": "blocks.{layer}.hook_mlp_out",
                     "att": "blocks.{layer}.attn.hook_z"}
"""Gemma Scope repo suffix (google/gemma-scope-2b-pt-res ...) -> the transformer_lens hook its SAEs read."""
_RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class PretrainedSAE:
    """One registry entry: where the SAE lives on the Hub and how it is stored."""

    release: str
    sae_id: str
    repo_id: str
    path: str
    model: str
    conversion: str | None


def is_pretrained_name(path: str | PurePath) -> bool:
    """RELEASE/SAE_ID: a relative path of at least two parts that does not exist locally, and no hub name."""
    text = path.as_posix() if isinstance(path, PurePath) else str(path)
    if text.startswith(HUB_PREFIX) or text.startswith("hf:/") or Path(text).expanduser().exists():
        return False
    first, _, rest = text.partition("/")
    return bool(rest) and _RELEASE.fullmatch(first) is not None


def registry_file() -> Path | None:
    """sae_lens' pretrained_saes.yaml, or None when sae_lens is not installed."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / REGISTRY_FILE
    return path if path.is_file() else None


def read_registry(path: Path) -> dict[str, dict]:
    """release -> its entry (repo_id, model, conversion_func, saes: [{id, path, ...}])."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SAEConfigError(f"cannot read SAELens' registry {path}: {exc}") from None
    releases = data.get("SAE_LOOKUP", data) if isinstance(data, dict) else None
    if not isinstance(releases, dict):
        raise SAEConfigError(f"SAELens' registry {path} has no release table")
    return releases


def resolve(name: str) -> PretrainedSAE:
    """The registry entry of "RELEASE/SAE_ID"; one SAEConfigError per problem, naming the nearest names."""
    path = registry_file()
    if path is None:
        raise SAEConfigError(
            f"{name} is not a folder; read as a SAELens pretrained name (RELEASE/SAE_ID) it needs the sae_lens "
            "package, whose registry lists the releases: pip install sae-lens"
        )
    releases = read_registry(path)
    release, _, sae_id = name.partition("/")
    if release not in releases:
        near = difflib.get_close_matches(release, list(releases), n=5, cutoff=0.5)
        hint = f"; nearest releases: {', '.join(near)}" if near else f" ({len(releases)} releases in {path})"
        raise SAEConfigError(f"{name} is not a folder, and {release!r} is not a SAELens release{hint}")
    entry = releases[release]
    saes = {str(s.get("id")): s for s in entry.get("saes") or [] if isinstance(s, dict)}
    if sae_id not in saes:
        near = difflib.get_close_matches(sae_id, list(saes), n=5, cutoff=0.4)
        hint = f"; nearest: {', '.join(near)}" if near else f"; it has {len(saes)}, e.g. {', '.join(list(saes)[:3])}"
        raise SAEConfigError(f"SAELens release {release!r} has no SAE {sae_id!r}{hint}")
    return PretrainedSAE(release, sae_id, str(entry["repo_id"]), str(saes[sae_id]["path"]), str(entry.get("model")),
                         entry.get("conversion_func") or None)


def pretrained_folder(name: str) -> Path:
    """A local SAELens folder for "RELEASE/SAE_ID": the Hub folder itself, or its one-time conversion."""
    entry = resolve(name)
    if entry.conversion not in CONVERSIONS:
        raise SAEConfigError(
            f"SAELens release {entry.release!r} stores its SAEs in the {entry.conversion!r} format, which is not "
            "converted here; loadable: SAELens folders and Gemma Scope (gemma_2)"
        )
    hub = HubName(entry.repo_id, entry.path.strip("/") or None)
    if entry.conversion is None:
        return download_sae_folder(hub)
    return _gemma_scope_folder(entry, download_folder(hub))


def _gemma_scope_folder(entry: PretrainedSAE, source: Path) -> Path:
    """Gemma Scope's params.npz (W_enc [d_in, d_sae], W_dec, b_enc, b_dec, threshold) as a SAELens jumprelu folder
    under $SAEWB_CACHE/pretrained/, written to a temp folder and renamed; reused once there."""
    target = cache_root() / "pretrained" / entry.release / entry.sae_id
    if (target / CFG_FILENAME).is_file() and (target / WEIGHTS_FILENAME).is_file():
        return target
    npz = source / "params.npz"
    if not npz.is_file():
        raise SAEConfigError(f"{HUB_PREFIX}{entry.repo_id}/{entry.path} holds no params.npz (Gemma Scope's format)")
    with np.load(npz) as params:
        tensors = {key: torch.from_numpy(np.asarray(params[key], dtype=np.float32)).contiguous()
                   for key in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if key in params}
    missing = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"} - set(tensors)
    if missing:
        raise SAEConfigError(f"{npz} lacks {', '.join(sorted(missing))} (Gemma Scope's JumpReLU parameters)")
    d_in, d_sae = tensors["W_enc"].shape
    kind = entry.repo_id.rsplit("-", 1)[-1]
    layer = re.search(r"layer_(\d+)", entry.path)
    hook = GEMMA_SCOPE_HOOKS[kind].format(layer=layer.group(1)) if kind in GEMMA_SCOPE_HOOKS and layer else None
    cfg = {
        "architecture": "jumprelu", "d_in": int(d_in), "d_sae": int(d_sae), "dtype": "float32",
        "apply_b_dec_to_input": False,  # Gemma Scope encodes x @ W_enc + b_enc
        "normalize_activations": "none",
        "metadata": {"model_name": entry.model, "hook_name": hook, "sae_lens_release": entry.release,
                     "sae_lens_id": entry.sae_id, "converted_from": f"{HUB_PREFIX}{entry.repo_id}/{entry.path}"},
    }
    with atomic_folder(target) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILENAME))
        (tmp / CFG_FILENAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return target
