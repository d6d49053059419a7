"""LoRA (Hu et al. 2021): train a low-rank update B·A beside frozen Linear weights, then merge it in or ship it alone.

    W x  →  W x + (alpha / rank) · B (A dropout(x)),   A: (rank, in), B: (out, rank), B = 0 at the start

The model stays a plain module: `apply_lora` swaps the targeted `nn.Linear` layers for
`LoraLinear` wrappers from outside and freezes everything else.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.atomic import write_files_atomically
from lmforge.errors import LmforgeError
from lmforge.inference.quantize import QuantizedLinear

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Our Linear layers by the names they have in model.py: attention (fused q/k/v, output) and MLP.
ALL_TARGETS = ("qkv", "out", "up", "down")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv", "out")
    # Modules trained in full beside the adapters (a new classification head, say); saved with them.
    trainable: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        self.targets, self.trainable = tuple(self.targets), tuple(self.trainable)
        if self.rank < 1:
            raise LmforgeError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise LmforgeError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


class LoraLinear(nn.Module):
    """A frozen layer plus a trainable low-rank update; `merge` folds the update into the base weight.

    The base may be a quantised layer (QLoRA-style: 4-bit base, float adapters); such a base can
    run with its adapter but cannot take it merged.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        device = next(itertools.chain(base.parameters(), base.buffers())).device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        # As the paper (and PEFT): A random, B zero, so training starts from the base model exactly.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        update = F.linear(F.linear(self.dropout(x), self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return y + self.scaling * update

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_b @ self.lora_a)

    def merge(self) -> None:
        if not isinstance(self.base, nn.Linear):
            raise LmforgeError(f"cannot merge LoRA into a {type(self.base).__name__}; load the base in float")
        if not self.merged:
            with torch.no_grad():
                self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def _is_target(name: str, targets: tuple[str, ...]) -> bool:
    return name.rsplit(".", 1)[-1] in targets or name in targets


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap every Linear whose last name part is in `config.targets`; freeze all but the adapters and `trainable`."""
    if any(True for _ in lora_layers(model)):
        raise LmforgeError("the model already has LoRA layers")
    wrapped = 0
    for name, module in list(model.named_modules()):
        if _is_target(name, config.targets) and isinstance(module, (nn.Linear, QuantizedLinear)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = LoraLinear(module, config.rank, config.alpha, config.dropout)
            setattr(parent, child, layer.train(module.training))  # an eval-mode model must not start dropping out
            wrapped += 1
    if not wrapped:
        raise LmforgeError(
            f"no layer matches the LoRA targets {list(config.targets)}; this model has e.g. {ALL_TARGETS}"
        )
    for parameter in model.parameters():
        parameter.requires_grad = False
    for _, layer in lora_layers(model):
        layer.lora_a.requires_grad = layer.lora_b.requires_grad = True
    for name in config.trainable:
        for parameter in model.get_submodule(name).parameters():
            parameter.requires_grad = True
    model.__dict__["lora_config"] = config
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Merge the adapters and put the plain base layers back: a model with no trace of LoRA (for export or serving)."""
    for name, layer in list(lora_layers(model)):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    for parameter in model.parameters():
        parameter.requires_grad = True
    model.__dict__.pop("lora_config", None)
    return model


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' A and B matrices and the fully trained modules, by their names in the model."""
    config: LoraConfig = model.__dict__["lora_config"]
    state = {}
    for name, layer in lora_layers(model):
        state[f"{name}.lora_a"], state[f"{name}.lora_b"] = layer.lora_a, layer.lora_b
    for module_name in config.trainable:
        for key, value in model.get_submodule(module_name).state_dict().items():
            state[f"{module_name}.{key}"] = value
    return {key: value.detach().contiguous().cpu() for key, value in state.items()}


def save_adapter(model: nn.Module, folder: str | Path, base_model: str | None = None) -> Path:
    """`adapter.safetensors` + `adapter_config.json` in `folder` (MBs, not the base's GBs); written atomically."""
    if "lora_config" not in model.__dict__:
        raise LmforgeError("the model has no LoRA adapters to save (apply_lora first)")
    if any(layer.merged for _, layer in lora_layers(model)):
        raise LmforgeError("unmerge the adapters before saving them")
    document = {**asdict(model.__dict__["lora_config"]), "base_model": base_model}
    from safetensors.torch import save_file

    weights = adapter_state_dict(model)
    return write_files_atomically(
        folder,
        {
            ADAPTER_WEIGHTS: lambda path: save_file(weights, str(path)),
            ADAPTER_CONFIG: lambda path: path.write_text(json.dumps(document, indent=2) + "\n"),
        },
    )


def read_adapter_config(folder: str | Path) -> tuple[LoraConfig, str | None]:
    path = Path(folder) / ADAPTER_CONFIG
    try:
        document = json.loads(path.read_text())
        base_model = document.pop("base_model", None)
        return LoraConfig(**document), base_model
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise LmforgeError(f"{path}: not a LoRA adapter config ({error})") from None


def describe_adapter(folder: str | Path) -> str:
    """One line that confirms what an applied adapter is: its rank and how many layers it changes."""
    from safetensors import safe_open

    config, _ = read_adapter_config(folder)
    with safe_open(str(Path(folder) / ADAPTER_WEIGHTS), "pt") as weights:
        layers = sum(key.endswith(".lora_a") for key in weights.keys())
    return (
        f"applied adapter {folder}: LoRA rank {config.rank} (alpha {config.alpha:g}) "
        f"on {layers} layers ({', '.join(config.targets)})"
    )


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply the adapter in `folder` to a base model (same architecture it was trained on) and load its weights."""
    from safetensors.torch import load_file

    config, _ = read_adapter_config(folder)
    apply_lora(model, config)
    weights = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise LmforgeError(
            f"{folder}: adapter does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise LmforgeError(
                f"{folder}: {key} has shape {tuple(value.shape)}, the model needs {tuple(expected[key].shape)}"
            )
    model.load_state_dict(weights, strict=False)
    return model
