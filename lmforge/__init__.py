"""lmforge: train, fine-tune, evaluate and serve GPT-style language models, CPU first."""

from __future__ import annotations

import importlib

from lmforge.errors import LmforgeError

__version__ = "0.1.0"
__all__ = ["LmforgeError", "load", "KVCache", "ModelConfig", "Transformer", "preset", "__version__"]

# Imported on first use (PEP 562): the model pulls in torch (3-9 s on a busy CPU), which
# `lmforge --help`, argument errors and the torch-free modules (cli, config, settings) must not wait for.
_LAZY = {
    "load": "lmforge.formats.loading",
    "KVCache": "lmforge.model",
    "ModelConfig": "lmforge.settings",
    "Transformer": "lmforge.model",
    "preset": "lmforge.settings",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
