"""Save and load SAEs as SAELens 6.x folders: cfg.json + sae_weights.safetensors.

Format facts read from SAELens (decoderesearch/SAELens, sae_lens/saes/sae.py `SAEConfig.to_dict`
and `save_model`, sae_lens/saes/topk_sae.py, sae_lens/saes/jumprelu_sae.py,
sae_lens/saes/batchtopk_sae.py, sae_lens/loading/pretrained_sae_loaders.py):
- weights W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in], and for
  jumprelu threshold [d_sae]; inference is (x - b_dec) @ W_enc + b_enc -> TopK-then-ReLU
  (topk) or ReLU(a) * (a > ReLU(threshold)) (jumprelu) -> @ W_dec + b_dec.
- cfg keys below; `metadata.sae_lens_version` >= 6.0.0 selects SAELens' 6.x config parser.
- BatchTopK is exported as jumprelu with its scalar threshold broadcast to every latent.

Our export: TopK and g-SAE -> "topk"; Mutual-/Feature-Choice -> "jumprelu". The scalar
normalisation c is folded into the biases: SAELens gets b_enc/c, b_dec/c, threshold/c, so it
computes our reconstruction exactly (up to float rounding) with unit-norm W_dec rows and latents
in original-space units (ours / c). Our own keys live under cfg.json["workbench"], and the
unfolded small tensors in workbench_state.safetensors, so `load` restores the SAE bit-for-bit.

This module only writes and reads files, from and to state dicts, configs and metadata; it knows no
SAE class (so sae/base.py can save through it). Building the SAE a folder describes is sae/loading.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sae.config import FORMAT_VERSION, SAEConfig
from sae.errors import SAEConfigError

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
WORKBENCH_TENSORS_FILENAME = "workbench_state.safetensors"

SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: the config layout we write, so SAELens parses it as 6.x."""

SAELENS_CFG_FIELDS = (
    "architecture",
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "metadata",
)
"""Keys of SAELens 6.x SAEConfig.to_dict() common to every architecture (sae_lens/saes/sae.py)."""

SAELENS_ARCH_CFG_FIELDS: dict[str, tuple[str, ...]] = {
    "topk": ("k", "rescale_acts_by_decoder_norm"),  # TopKSAEConfig, sae_lens/saes/topk_sae.py
    "jumprelu": (),  # JumpReLUSAEConfig adds no fields, sae_lens/saes/jumprelu_sae.py
    "standard": (),  # StandardSAEConfig: a ReLU SAE (loaded only: sae/architectures/relu.py)
}

SAELENS_WEIGHT_SHAPES: dict[str, dict[str, tuple[str, ...]]] = {
    "topk": {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_enc": ("d_sae",), "b_dec": ("d_in",)},
    "jumprelu": {
        "W_enc": ("d_in", "d_sae"),
        "W_dec": ("d_sae", "d_in"),
        "b_enc": ("d_sae",),
        "b_dec": ("d_in",),
        "threshold": ("d_sae",),
    },
    "standard": {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_enc": ("d_sae",), "b_dec": ("d_in",)},
}
"""Tensor names and shapes in sae_weights.safetensors per SAELens architecture."""
SAELENS_TO_OURS = {"standard": "relu"}
"""SAELens architectures registered here under another name (the others keep theirs)."""

SAELENS_NORMALIZE_ACTIVATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
"""Values SAELens accepts for normalize_activations (SAEConfig.__post_init__)."""

_EXPORT_NORMALIZATION = {"scalar": "none", "per_token_standardize": "layer_norm", "none": "none"}
_VERSION_KEYS = ("sae_lens_version", "sae_lens_training_version")


def write_folder(
    path: str | Path,
    *,
    cfg: SAEConfig,
    saelens_architecture: str,
    state: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    training_info: dict[str, Any],
) -> Path:
    """Write an SAE's state dict and config into directory `path` (created if needed); returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in state.items()}  # device-independent files
    scalar = cfg.normalization == "scalar"
    c = state["norm_scale"]
    weights = {
        "W_enc": state["W_enc"],
        "W_dec": state["W_dec"],
        "b_enc": state["b_enc"] / c if scalar else state["b_enc"],
        "b_dec": state["b_dec"] / c if scalar else state["b_dec"],
    }
    if saelens_architecture == "jumprelu":
        threshold = state["threshold"].expand(cfg.n_features)
        weights["threshold"] = (threshold / c if scalar else threshold).contiguous()
    extras = {name: t for name, t in state.items() if name not in ("W_enc", "W_dec")}
    contents = saelens_cfg(cfg, saelens_architecture, state["W_enc"].dtype, float(c), metadata, training_info)
    # Each file is written under a temp name and renamed, so rewriting a folder in place (saewb calibrate)
    # never leaves a half-written file; cfg.json goes last.
    _replace(path / WEIGHTS_FILENAME, lambda tmp: save_file(weights, str(tmp)))
    _replace(path / WORKBENCH_TENSORS_FILENAME, lambda tmp: save_file(extras, str(tmp)))
    _replace(path / CFG_FILENAME, lambda tmp: tmp.write_text(json.dumps(contents, indent=2)))
    return path


def _replace(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def saelens_cfg(
    cfg: SAEConfig,
    saelens_architecture: str,
    dtype: torch.dtype,
    norm_scale: float,
    metadata: dict[str, Any],
    training_info: dict[str, Any],
) -> dict[str, Any]:
    """cfg.json contents: SAELens 6.x keys plus our own under "workbench"."""
    hook_name = str(metadata.get("hook_name") or "")
    out: dict[str, Any] = {
        "architecture": saelens_architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.n_features,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": _EXPORT_NORMALIZATION[cfg.normalization],
        "reshape_activations": "hook_z" if hook_name.endswith("hook_z") else "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None, **metadata},
    }
    if saelens_architecture == "topk":
        out["k"] = cfg.inference_k or cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    out["workbench"] = {
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(cfg),
        "norm_scale": norm_scale,
        "training": training_info,
        "note": "SAELens tensors have b_enc, b_dec and threshold divided by norm_scale (scalar normalisation); "
        "workbench_state.safetensors holds them unfolded.",
    }
    return out


def read_cfg(path: Path) -> dict[str, Any]:
    """cfg.json of folder `path`, which must be a JSON object."""
    cfg_path = path / CFG_FILENAME
    if not cfg_path.is_file():
        raise SAEConfigError(f"{path} is not an SAE folder: {CFG_FILENAME} is missing.")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SAEConfigError(f"{cfg_path} is not valid JSON ({exc}); rewrite it or save the SAE again.") from None
    if not isinstance(cfg, dict):
        raise SAEConfigError(f"{cfg_path} must hold a JSON object, found a {type(cfg).__name__}.")
    return cfg


def header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, without reading the tensors."""
    if not file.is_file():
        raise SAEConfigError(f"{file.name} is missing from {file.parent}.")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error type for anything that is not one of its files
        raise SAEConfigError(
            f"{file} is not a readable safetensors file ({exc}); only safetensors are loaded, never pickles."
        ) from None


FINITE_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec", "norm_scale")
"""Weights that must be finite; thresholds may be ±inf (a latent never seen fires never, or always)."""


def read_finite(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose header was already checked; non-finite weights are refused."""
    tensors = load_file(str(file))
    for name, t in tensors.items():
        if name in FINITE_TENSORS and not bool(torch.isfinite(t).all()):
            raise SAEConfigError(f"{file} holds NaN/inf values in {name}; the SAE cannot be used.")
    return tensors


def _size(cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SAEConfigError(f"{CFG_FILENAME} needs {key} as a positive integer, found {value!r}.")
    return value


def workbench_config(path: Path, cfg: dict[str, Any]) -> SAEConfig:
    """The SAEConfig in cfg.json's workbench block, checked against the version and the top-level sizes."""
    ours = cfg["workbench"]
    if not isinstance(ours, dict) or not isinstance(ours.get("config"), dict):
        raise SAEConfigError(f"{CFG_FILENAME}'s workbench block must be an object with a config object.")
    if ours.get("format_version", 0) > FORMAT_VERSION:
        raise SAEConfigError(
            f"{path} was written with workbench format_version {ours['format_version']}; "
            f"this version reads up to {FORMAT_VERSION}."
        )
    try:
        sae_cfg = SAEConfig(**ours["config"])
    except TypeError as exc:  # a missing or unknown key
        raise SAEConfigError(f"{CFG_FILENAME}'s workbench config is incomplete or has unknown keys ({exc}).") from None
    for key, ours_value in (("d_in", sae_cfg.d_in), ("d_sae", sae_cfg.n_features)):
        if key in cfg and cfg[key] != ours_value:  # SAELens would read these sizes instead of ours
            raise SAEConfigError(
                f"{CFG_FILENAME} says {key}={cfg[key]!r} at the top level but {ours_value} in its workbench block."
            )
    return sae_cfg


def check_workbench_shapes(
    path: Path,
    weight_shapes: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    optional: tuple[str, ...],
    sae_cfg: SAEConfig,
) -> None:
    """The folder's tensor shapes (from the headers) are the `expected` ones; `optional` ones may be absent."""
    found = {
        **header_shapes(path / WORKBENCH_TENSORS_FILENAME),
        **{k: v for k, v in weight_shapes.items() if k in ("W_enc", "W_dec")},
    }
    for name, shape in expected.items():
        if name not in found and name not in optional:
            raise SAEConfigError(f"tensor {name} is missing from the weights of this {sae_cfg.arch} SAE.")
        if name in found and found[name] != shape:
            raise SAEConfigError(
                f"tensor {name} has shape {found[name]}, but the config (d_in={sae_cfg.d_in}, "
                f"n_features={sae_cfg.n_features}) needs {shape}."
            )


def read_workbench_state(path: Path) -> dict[str, torch.Tensor]:
    """The unfolded state dict of a workbench folder (small tensors, then W_enc and W_dec), all checked finite."""
    state = read_finite(path / WORKBENCH_TENSORS_FILENAME)
    weights = read_finite(path / WEIGHTS_FILENAME)
    state.update(W_enc=weights["W_enc"], W_dec=weights["W_dec"])
    return state


def folder_metadata(cfg: dict[str, Any]) -> dict[str, Any]:
    """cfg.json's metadata without the SAELens version keys (they are rewritten on save)."""
    return {k: v for k, v in cfg.get("metadata", {}).items() if k not in _VERSION_KEYS}


def read_saelens(
    cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]], weights_file: Path
) -> tuple[SAEConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(our SAEConfig, state dict, metadata) from a SAELens cfg dict (no workbench keys) and its weights file,
    whose header shapes are checked against the config before the tensors are read."""
    arch = cfg.get("architecture", "standard")
    if arch not in SAELENS_WEIGHT_SHAPES:
        raise SAEConfigError(
            f"SAELens architecture {arch!r} is not supported; loadable: {', '.join(SAELENS_WEIGHT_SHAPES)}."
        )
    d_in, d_sae = _size(cfg, "d_in"), _size(cfg, "d_sae")
    _check_saelens_weights(arch, shapes, {"d_in": d_in, "d_sae": d_sae})
    weights = {name: t.float() for name, t in read_finite(weights_file).items()}
    normalize = cfg.get("normalize_activations") or "none"
    if normalize is True:  # pre-6 configs stored a bool
        normalize = "expected_average_only_in"
    if normalize == "expected_average_only_in":
        warnings.warn(
            "this SAELens folder uses normalize_activations='expected_average_only_in', whose scaling "
            "factor is not stored in the folder; like SAELens' load_from_disk, no scaling is applied.",
            stacklevel=2,
        )
    ours = {"none": "none", "expected_average_only_in": "none", "layer_norm": "per_token_standardize"}
    if normalize not in ours:
        raise SAEConfigError(
            f"SAELens normalize_activations={normalize!r} is not supported; loadable: {', '.join(ours)}."
        )
    k = None
    if arch == "topk":
        k = cfg.get("k") or cfg.get("activation_fn_kwargs", {}).get("k")
        if cfg.get("rescale_acts_by_decoder_norm"):  # fold ||W_dec_i|| into the encoder, as SAELens does
            norms = weights["W_dec"].norm(dim=1).clamp_min(1e-8)
            weights["W_enc"] = weights["W_enc"] * norms
            weights["b_enc"] = weights["b_enc"] * norms
            weights["W_dec"] = weights["W_dec"] / norms.unsqueeze(1)
    sae_cfg = SAEConfig(
        arch=SAELENS_TO_OURS.get(arch, arch),
        d_in=d_in,
        n_features=d_sae,
        k=None if k is None else int(k),
        normalization=ours[normalize],
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
    )
    metadata = dict(cfg.get("metadata") or {})
    for key in ("model_name", "hook_name", "hook_point", "hook_head_index", "context_size", "prepend_bos"):
        if key in cfg and key not in metadata:  # pre-6 configs kept these at the top level
            metadata["hook_name" if key == "hook_point" else key] = cfg[key]
    metadata = {k: v for k, v in metadata.items() if k not in _VERSION_KEYS}
    return sae_cfg, {**weights, "norm_scale": torch.tensor(1.0)}, metadata


def _check_saelens_weights(arch: str, shapes: dict[str, tuple[int, ...]], dims: dict[str, int]) -> None:
    """The tensor names and shapes a SAELens architecture needs (from a header, or from loaded tensors)."""
    expected = SAELENS_WEIGHT_SHAPES[arch]
    if set(shapes) != set(expected):
        raise SAEConfigError(
            f"SAELens {arch} weights must be exactly {sorted(expected)}, found {sorted(shapes)}."
        )
    for name, names in expected.items():
        shape = tuple(dims[n] for n in names)
        if tuple(shapes[name]) != shape:
            raise SAEConfigError(
                f"SAELens tensor {name} has shape {tuple(shapes[name])}, expected {shape} "
                f"[{', '.join(names)}]."
            )
