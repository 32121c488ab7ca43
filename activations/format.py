"""The on-disk cache format that the writer (cache.py) and the reader (reader.py) share: the manifest's name and
version, the stored dtypes, checksums, and the cache's error."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# numpy has no bfloat16: those rows are stored as their raw 16 bits and viewed back in torch.
STORAGE_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


class CacheError(ValueError):
    """Bad cache arguments, a clash with an existing cache, or a failure to write one."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
