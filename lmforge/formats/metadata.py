"""Model metadata read from files (GGUF key/values, HF config.json), checked before it sizes anything.

A file's numbers become tensor shapes, divisors and allocation sizes; a damaged or hostile one
must come out as a message naming the file and the field, not a ZeroDivisionError or a 32 GB
allocation. The GGUF and HF readers share these checks.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.settings import ModelConfig

# model_type -> our family name, for the Llama-like families (RMSNorm, RoPE, gated MLP) and GPT-2.
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "gpt2": "gpt2",
}

# Above every published model's vocabulary, width, depth and context (Llama 4 Scout: 10M positions);
# a larger value is a damaged or hostile file.
MAX_DIMENSION = 1 << 24
MISSING = object()


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, tokenizer_config.json)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise LmforgeError(f"{path}: cannot read it ({error})") from None
    except json.JSONDecodeError as error:
        raise LmforgeError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise LmforgeError(f"{path}: expected a JSON object, found a {type(values).__name__}")
    return values


def integer(
    values: dict, key: str, where: Path, default=MISSING, minimum: int = 1, maximum: int = MAX_DIMENSION
) -> int:
    """values[key] as an int in minimum..maximum; a missing or null value takes `default`, if given."""
    value = values.get(key)
    if value is None:
        if default is MISSING:
            raise LmforgeError(f"{where}: {key} is missing")
        value = default
    if isinstance(value, float) and value.is_integer():  # 64.0 from a tool that writes every number as float
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise LmforgeError(f"{where}: {key}={value!r} is not an integer")
    if not minimum <= value <= maximum:
        raise LmforgeError(f"{where}: {key}={value} is out of range ({minimum}..{maximum})")
    return value


def positive_number(values: dict, key: str, where: Path, default: float) -> float:
    """values[key] as a finite float > 0 (an epsilon, a RoPE base); missing or null takes `default`."""
    value = values.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise LmforgeError(f"{where}: {key}={value!r} is not a positive number")
    return float(value)


def boolean(values: dict, key: str, where: Path, default: bool) -> bool:
    value = values.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise LmforgeError(f"{where}: {key}={value!r} is not true or false")
    return value


def model_config(where: Path, names: dict[str, str], **values) -> ModelConfig:
    """A ModelConfig from checked values; `names` gives the file's key for each of its fields, for the messages."""
    d_model, n_heads = values["d_model"], values["n_heads"]
    kv_heads = values.get("n_kv_heads") or n_heads
    if values.get("d_head") is None and d_model % n_heads:  # with its own head width, no need to divide
        raise LmforgeError(f"{where}: {names['d_model']}={d_model} is not divisible by {names['n_heads']}={n_heads}")
    if n_heads % kv_heads:
        raise LmforgeError(
            f"{where}: {names['n_heads']}={n_heads} is not divisible by {names['n_kv_heads']}={kv_heads}"
        )
    try:
        return ModelConfig(**values)
    except ValueError as error:
        raise LmforgeError(f"{where}: {error}") from None


def check_dimensions(config: ModelConfig, weights: dict, where: Path, names: dict[str, str]) -> None:
    """The config's sizes against the tensors that carry them, before a model of that config is built:
    its placeholders take the metadata's word for how big to be, the file's tensors do not."""
    sizes = {"vocab_size": config.vocab_size, "d_model": config.d_model, "d_mlp": config.mlp_hidden}
    sizes["block_size"] = config.block_size
    expected = {
        "token_embedding.weight": ("vocab_size", "d_model"),
        "blocks.0.mlp.down.weight": ("d_model", "d_mlp"),
    }
    if config.positions == "learned":
        expected["position_embedding.weight"] = ("block_size", "d_model")
    for name, fields in expected.items():
        if name not in weights:
            continue  # a missing weight is reported by name when the model takes its weights
        shape = tuple(sizes[field] for field in fields)
        actual = tuple(weights[name].shape)
        if actual != shape:
            said = " and ".join(f"{names[field]}={sizes[field]}" for field in fields)
            raise LmforgeError(f"{where}: weight {name} has shape {actual}, but {said} make it {shape}")


def available_memory_bytes() -> int | None:
    """Memory this process can still take: MemAvailable (Linux), else free physical pages, else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(needed_bytes: int, where: Path) -> None:
    """Refuse, with the numbers, to load weights that cannot fit in the memory available now."""
    available = available_memory_bytes()
    if available is not None and needed_bytes > available:
        raise LmforgeError(
            f"{where}: loading needs about {needed_bytes / 1e9:.2f} GB of memory for the weights, "
            f"but only {available / 1e9:.2f} GB is available"
        )


SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


def sampling_settings(values: dict, where: Path, names: dict[str, str]) -> dict:
    """The sampling settings a file names, as SamplingConfig fields, each checked; `names` gives the
    file's key for each field it can hold. A top_k of 0 (or below) and a top_p of 1 mean "off"."""
    settings = {}
    for field, key in names.items():
        value = values.get(key)
        if value is None:
            continue
        if field in ("top_k", "max_new_tokens"):
            number = integer(values, key, where, minimum=-1 if field == "top_k" else 1)
            settings[field] = None if field == "top_k" and number <= 0 else number
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LmforgeError(f"{where}: {key}={value!r} is not a number")
        if field == "temperature" and value < 0:
            raise LmforgeError(f"{where}: {key}={value} is negative (0 means greedy)")
        if field == "top_p" and not 0 < value <= 1:
            raise LmforgeError(f"{where}: {key}={value} is out of range (0 < top_p <= 1)")
        if field == "repetition_penalty" and value <= 0:
            raise LmforgeError(f"{where}: {key}={value} is not a positive number (1 means no penalty)")
        settings[field] = None if field == "top_p" and value == 1 else float(value)
    return settings
