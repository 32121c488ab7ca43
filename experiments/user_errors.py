"""What counts as the user's mistake, and running a command so that one is a single line on stderr (exit 2)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from activations import CacheError, CorpusError, HookError, ModelLoadError
from experiments.analysis.errors import AnalysisError
from experiments.analysis.store import StoreError
from experiments.steering import InputError
from sae.errors import SAEError

USER_ERRORS: tuple[type[BaseException], ...] = (
    CacheError, CorpusError, HookError, ModelLoadError, SAEError, AnalysisError, StoreError, InputError,
)
"""Errors that are the user's input, printed as one line instead of a traceback."""


def run_user_command(command: str, func: Callable[[], int]) -> int:
    """Run a command; the user's mistakes become one line on stderr and exit code 2, never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return func()
    except KeyboardInterrupt:
        print("saewb: interrupted; rerun the same command to resume from the last complete step", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"saewb {command}: error: {exc}", file=sys.stderr)
        return 2
