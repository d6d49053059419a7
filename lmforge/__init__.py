"""lmforge: train, fine-tune, evaluate and serve GPT-style language models, CPU first."""

from lmforge.errors import LmforgeError
from lmforge.loading import load
from lmforge.model import KVCache, ModelConfig, Transformer, preset

__version__ = "0.1.0"
__all__ = ["LmforgeError", "load", "KVCache", "ModelConfig", "Transformer", "preset", "__version__"]
