"""Activations: models, corpora, and the sharded on-disk activation cache."""

from activations.cache import CacheConfig, build_cache
from activations.corpus import DEFAULT_CORPUS, CorpusError, load_corpus
from activations.format import CacheError
from activations.hf_backend import backend_of_hook
from activations.hooks import HookError
from activations.models import DEFAULT_MODEL, ModelLoadError, available_models, load_model
from activations.reader import ActivationCache, load_cache

__all__ = [
    "DEFAULT_CORPUS",
    "DEFAULT_MODEL",
    "ActivationCache",
    "CacheConfig",
    "CacheError",
    "CorpusError",
    "HookError",
    "ModelLoadError",
    "available_models",
    "backend_of_hook",
    "build_cache",
    "load_cache",
    "load_corpus",
    "load_model",
]
