"""The training entry points: `build_trainer` (configs, data and SAE put together) and `train` (that, then run).

Both take one signature, written once on `build_trainer`. Options are routed to SAEConfig or
TrainConfig by the field table of sae/config.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from os import PathLike
from typing import Any, ParamSpec, TypeVar

from torch import Tensor

from activations.reader import load_cache
from sae.base import SAE
from sae.config import SAEConfig, TrainConfig, fields_with_role
from sae.distributed import Collectives, check_divisible, default_collectives
from sae.errors import SAEConfigError
from sae.registry import get_architecture
from sae.training.streams import ActivationSource, BatchStream, make_stream
from sae.training.tracking import LogFn
from sae.training.trainer import Trainer

P = ParamSpec("P")
R = TypeVar("R")


def build_trainer(
    activations: Any,
    *,
    arch: str,
    n_features: int,
    k: int,
    grads: Tensor | None = None,
    batch_size: int = 4096,
    total_tokens: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    log_fn: LogFn | None = None,
    metadata: dict[str, Any] | None = None,
    collectives: Collectives | None = None,
    **options: Any,
) -> Trainer:
    """The Trainer that `train` runs: configs validated, data wrapped as a stream, SAE initialised from `seed`.

    activations: tensor [N, d] (with optional grads [N, d]), an iterable of batches (tensors or
    (acts, grads) pairs), a cache directory path (read with `activations.load_cache`), a cache-like
    object (sae.training.streams.ActivationSource), or a BatchStream (several trainers can share one
    stream, reading each batch once). total_tokens defaults to one pass.
    options: any SAEConfig or TrainConfig field (see sae.config), e.g. normalization="none",
    checkpoint_dir=..., progress=False. metadata: SAELens metadata (model_name, hook_name, ...).
    collectives: data-parallel ranks (sae/distributed.py); default: the initialised torch.distributed
    process group when there is one (torchrun), else a single process. batch_size is the global batch.
    """
    cls = get_architecture(arch, trainable=True)
    sae_keys = fields_with_role("sae", explicit=False)
    train_keys = fields_with_role("train", "run_only", explicit=False)
    unknown = sorted(set(options) - sae_keys - train_keys)
    if unknown:
        allowed = ", ".join(sorted(sae_keys | train_keys))
        raise SAEConfigError(f"unknown option(s) {', '.join(unknown)}; allowed: {allowed}.")
    train_cfg = TrainConfig(
        batch_size=batch_size,
        total_tokens=total_tokens,
        lr=lr,
        seed=seed,
        **{key: v for key, v in options.items() if key in train_keys},
    )
    sae_options = {key: v for key, v in options.items() if key in sae_keys}
    cls.validate_config(SAEConfig(arch=arch, d_in=1, n_features=n_features, k=k, **sae_options))  # before any data
    metadata = dict(metadata or {})
    if isinstance(activations, (str, PathLike)):
        activations = load_cache(activations)
    if isinstance(activations, ActivationSource):
        metadata = {**_cache_metadata(activations), **metadata}
    coll = collectives or default_collectives()
    check_divisible(batch_size, coll.world_size)
    if isinstance(activations, BatchStream):
        stream = activations  # under data parallelism: already this rank's share
    else:
        stream = make_stream(
            activations, grads, batch_size, train_cfg.shuffle, seed, coll.rank, coll.world_size,
            train_cfg.shuffle_buffer_rows,
        )
    sae_cfg = SAEConfig(arch=arch, d_in=stream.d_in, n_features=n_features, k=k, **sae_options)
    sae = cls(sae_cfg, seed=seed)
    sae.metadata = metadata
    return Trainer(sae, stream, train_cfg, log_fn, coll)


def takes_parameters_of(source: Callable[P, Any]) -> Callable[[Callable[..., R]], Callable[P, R]]:
    """Give the decorated function `source`'s parameters (for help(), inspect and type checkers)."""

    def apply(target: Callable[..., R]) -> Callable[P, R]:
        returns = inspect.signature(target).return_annotation
        target.__signature__ = inspect.signature(source).replace(return_annotation=returns)  # type: ignore[attr-defined]
        return target

    return apply


@takes_parameters_of(build_trainer)
def train(*args: Any, **kwargs: Any) -> SAE:
    """Train an SAE of architecture `arch` on activations and return it: `build_trainer(...).run()`.

    The parameters are build_trainer's, e.g. sae.train(acts, arch="topk", n_features=4096, k=32).
    """
    return build_trainer(*args, **kwargs).run()


def _cache_metadata(cache: ActivationSource) -> dict[str, Any]:
    """SAELens metadata a cache can tell: its model and its first hook (the one iter_batches reads)."""
    found: dict[str, Any] = {}
    if isinstance(getattr(cache, "model", None), str):
        found["model_name"] = cache.model  # type: ignore[attr-defined]
    hooks = getattr(cache, "hooks", None)
    if isinstance(hooks, list) and hooks:
        found["hook_name"] = hooks[0]
    return found
