"""HF transformers folders (config.json + safetensors + tokenizer.json): Llama and GPT-2 families.

Reading maps HF names onto ours (q/k/v and gate/up are fused here); writing does the reverse,
so `transformers.AutoModelForCausalLM.from_pretrained` loads what we export.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lmforge.atomic import write_files_atomically
from lmforge.errors import LmforgeError
from lmforge.formats.metadata import (
    HF_MODEL_TYPES,
    MISSING,
    SAMPLING_FIELDS,
    boolean,
    check_dimensions,
    check_memory,
    integer,
    model_config,
    positive_number,
    read_json_object,
    sampling_settings,
)
from lmforge.inference.quantize import as_float, model_weights
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import BPETokenizer, CharTokenizer, Tokenizer

# family -> (model_type, class) that exports write and transformers' Auto classes load
EXPORTED_AS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "gpt2": ("gpt2", "GPT2LMHeadModel"),
}
MIXTURE_OF_EXPERTS_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "dbrx", "olmoe")

LLAMA_KEYS = dict(
    vocab_size="vocab_size",
    block_size="max_position_embeddings",
    n_layers="num_hidden_layers",
    n_heads="num_attention_heads",
    n_kv_heads="num_key_value_heads",
    d_model="hidden_size",
    d_mlp="intermediate_size",
)
GPT2_KEYS = dict(
    vocab_size="vocab_size",
    block_size="n_positions",
    n_layers="n_layer",
    n_heads="n_head",
    n_kv_heads="n_head",
    d_model="n_embd",
    d_mlp="n_inner",
)
# What each rope_type keeps from HF's rope parameters (ModelConfig.rope_scaling's form is HF's).
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
        "truncate",
    ),
}
ROPE_REQUIRED_KEYS = {"linear": 1, "llama3": 4, "yarn": 2}  # the first n of ROPE_SCALING_KEYS must be there


def read_rope(parameters: dict, path: Path) -> tuple[float, dict | None]:
    """(rope_theta, ModelConfig.rope_scaling) from HF's rope parameters of one attention kind: transformers 5's
    rope_parameters, or the older rope_theta + rope_scaling merged into one mapping by the caller."""
    theta = positive_number(parameters, "rope_theta", path, 10000.0)
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_KEYS:
        raise LmforgeError(
            f"{path}: RoPE scaling {kind!r} is not supported (supported: default, {', '.join(ROPE_SCALING_KEYS)})"
        )
    scaling = {"rope_type": kind}
    for index, key in enumerate(ROPE_SCALING_KEYS[kind]):
        value = parameters.get(key)
        if value is None:
            if index < ROPE_REQUIRED_KEYS[kind]:
                raise LmforgeError(f"{path}: RoPE scaling {kind!r} needs {key}")
            continue
        if key == "truncate":
            scaling[key] = boolean(parameters, key, path, True)
        elif key == "original_max_position_embeddings":
            scaling[key] = integer(parameters, key, path)
        else:
            scaling[key] = positive_number(parameters, key, path, 1.0)
    return theta, scaling


def _rope_parameters(values: dict, path: Path, layer_type: str | None = None) -> dict:
    """HF's rope parameters as one mapping: rope_parameters (per layer type where `layer_type` is given,
    as Gemma 3 writes them), over the older top-level rope_theta and rope_scaling."""
    parameters = values.get("rope_parameters") or {}
    scaling = values.get("rope_scaling")
    if not isinstance(parameters, dict) or not isinstance(scaling, (dict, type(None))):
        raise LmforgeError(f"{path}: rope_parameters and rope_scaling must be JSON objects")
    if layer_type is not None and isinstance(parameters.get(layer_type), dict):
        parameters = parameters[layer_type]
    elif layer_type is not None and layer_type in parameters:
        raise LmforgeError(f"{path}: rope_parameters.{layer_type} must be a JSON object")
    legacy = {"rope_theta": values.get("rope_theta")}
    if layer_type == "sliding_attention":
        legacy = {"rope_theta": values.get("rope_local_base_freq", 10000.0)}
    elif scaling:
        legacy |= scaling
    return {key: value for key, value in (legacy | parameters).items() if value is not None}


def _layer_types(values: dict, path: Path, n_layers: int) -> list[str] | None:
    """config.json's layer_types as ours ("sliding" | "full"), or Gemma 3's older sliding_window_pattern
    (every n-th layer full); None when it names neither."""
    theirs = values.get("layer_types")
    if theirs is None and "sliding_window_pattern" in values:
        pattern = integer(values, "sliding_window_pattern", path, minimum=1)
        theirs = ["full_attention" if (layer + 1) % pattern == 0 else "sliding_attention" for layer in range(n_layers)]
    if theirs is None:
        return None
    names = {"sliding_attention": "sliding", "full_attention": "full"}
    if not isinstance(theirs, list) or len(theirs) != n_layers or not all(kind in names for kind in theirs):
        raise LmforgeError(
            f"{path}: layer_types should list num_hidden_layers={n_layers} of 'sliding_attention' | 'full_attention'"
        )
    return [names[kind] for kind in theirs]


def read_config(values: dict, path: Path) -> ModelConfig:
    """Our config from config.json's values, every field checked (type, range, divisibility) before use."""
    model_type = values.get("model_type")
    if model_type in MIXTURE_OF_EXPERTS_TYPES:
        raise LmforgeError(f"{path}: model_type {model_type!r} is a mixture-of-experts model, not supported yet")
    if model_type == "gemma3" and "text_config" in values:
        raise LmforgeError(
            f"{path}: a vision-language Gemma 3 folder (model_type 'gemma3'); its text-only models "
            f"(model_type 'gemma3_text', e.g. gemma-3-1b) are supported"
        )
    family = HF_MODEL_TYPES.get(model_type)
    if family is None:
        supported = ", ".join(HF_MODEL_TYPES)
        raise LmforgeError(f"{path}: model_type {model_type!r} is not supported (supported: {supported})")
    if family == "gpt2":
        return _gpt2_config(values, path)
    sizes = {
        ours: integer(values, theirs, path, default=2048 if ours == "block_size" else MISSING)
        for ours, theirs in LLAMA_KEYS.items()
        if ours != "n_kv_heads"
    }
    sizes["n_kv_heads"] = integer(values, "num_key_value_heads", path, default=sizes["n_heads"])
    heads, width = sizes["n_heads"], sizes["d_model"]
    # head_dim where config.json names one (Qwen3, Gemma 3); else hidden_size must divide (model_config says so)
    head_dim = integer(values, "head_dim", path) if values.get("head_dim") is not None else None
    switches: dict = dict(d_head=head_dim if head_dim and head_dim * heads != width else None, architecture=family)
    head_dim = head_dim or width // heads
    if family in ("llama", "mistral", "phi3"):
        if values.get("attention_bias") or values.get("mlp_bias"):
            raise LmforgeError(f"{path}: {model_type} models with attention/MLP biases are not supported")
    if family == "phi3":
        rope = _rope_parameters(values, path)
        partial = values.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
        if partial not in (None, 1, 1.0):
            raise LmforgeError(f"{path}: partial_rotary_factor={partial} (RoPE on part of each head) is not supported")
        kind = rope.get("rope_type", rope.get("type"))
        if kind in ("longrope", "su", "yarn"):  # transformers reads Phi-3's "su" and "yarn" as longrope too
            raise LmforgeError(f"{path}: Phi-3's RoPE scaling {kind!r} (LongRoPE, the 128k models) is not supported")
    if family == "qwen2":
        switches["qkv_bias"] = True
    if family == "qwen3":
        if values.get("attention_bias"):
            raise LmforgeError(f"{path}: Qwen3 models with attention biases are not supported")
        switches["qk_norm"] = True
    if family == "gemma3":
        if values.get("attn_logit_softcapping") is not None:
            raise LmforgeError(f"{path}: attn_logit_softcapping (Gemma 2's) is not supported")
        if values.get("use_bidirectional_attention"):
            raise LmforgeError(f"{path}: use_bidirectional_attention (an encoder Gemma) is not supported")
        activation = values.get("hidden_activation", values.get("hidden_act", "gelu_pytorch_tanh"))
        if activation != "gelu_pytorch_tanh":
            raise LmforgeError(f"{path}: Gemma 3 activation {activation!r} is not supported (gelu_pytorch_tanh)")
        scalar = positive_number(values, "query_pre_attn_scalar", path, float(head_dim))
        cap = values.get("final_logit_softcapping")
        switches |= dict(
            mlp="geglu",
            qk_norm=True,
            post_norms=True,
            scale_embeddings=True,
            attention_scale=scalar**-0.5,
            logit_softcap=None if cap is None else positive_number(values, "final_logit_softcapping", path, 1.0),
        )
    # Sliding windows: every layer (Mistral, Phi-3), or the layers layer_types names (Qwen2/3, Gemma 3).
    window = None if values.get("sliding_window") is None else integer(values, "sliding_window", path, minimum=1)
    if family in ("qwen2", "qwen3") and not boolean(values, "use_sliding_window", path, False):
        window = None
    layer_types = _layer_types(values, path, sizes["n_layers"]) if family != "llama" else None
    if family == "gemma3" and layer_types is None:
        layer_types = _layer_types({"sliding_window_pattern": 6}, path, sizes["n_layers"])  # transformers' default
    if family in ("qwen2", "qwen3") and layer_types is None and window is not None:
        # configs before layer_types: layers from max_window_layers on slide, as transformers derives it
        first = integer(values, "max_window_layers", path, default=sizes["n_layers"], minimum=0)
        layer_types = ["sliding" if layer >= first else "full" for layer in range(sizes["n_layers"])]
    if window is None or (layer_types is not None and "sliding" not in layer_types):
        window, layer_types = None, None
    elif layer_types is not None and "full" not in layer_types:
        layer_types = None
    if family == "llama":
        window = None
    switches |= dict(sliding_window=window, layer_types=layer_types)
    if family == "gemma3":
        theta, scaling = read_rope(_rope_parameters(values, path, "full_attention"), path)
        local_theta, local_scaling = read_rope(_rope_parameters(values, path, "sliding_attention"), path)
        if local_scaling is not None:
            raise LmforgeError(f"{path}: RoPE scaling of Gemma 3's sliding layers is not supported")
        switches["rope_local_theta"] = local_theta
    else:
        theta, scaling = read_rope(_rope_parameters(values, path), path)
    tie_default = family == "gemma3"  # transformers' default where config.json does not say
    return model_config(
        path,
        LLAMA_KEYS,
        **sizes,
        norm="rmsnorm",
        norm_eps=positive_number(values, "rms_norm_eps", path, 1e-6),
        mlp=switches.pop("mlp", "swiglu"),
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        bias=False,
        tie_embeddings=boolean(values, "tie_word_embeddings", path, tie_default),
        **switches,
    )


def _gpt2_config(values: dict, path: Path) -> ModelConfig:
    activation = values.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise LmforgeError(f"{path}: GPT-2 activation {activation!r} is not supported")
    sizes = {
        ours: integer(values, theirs, path, default=1024 if ours == "block_size" else MISSING)
        for ours, theirs in GPT2_KEYS.items()
        if ours not in ("n_kv_heads", "d_mlp")
    }
    return model_config(
        path,
        GPT2_KEYS,
        **sizes,
        d_mlp=integer(values, "n_inner", path, default=4 * sizes["d_model"]),
        norm="layernorm",
        norm_eps=positive_number(values, "layer_norm_epsilon", path, 1e-5),
        mlp="gelu" if activation == "gelu" else "gelu_tanh",
        positions="learned",
        bias=True,
        tie_embeddings=boolean(values, "tie_word_embeddings", path, True),
    )


SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of the folder's safetensors file(s), as fp32, after checking that they fit in memory."""
    index = folder / SAFETENSORS_INDEX
    files = ["model.safetensors"]
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise LmforgeError(f"{index}: weight_map should map weight names to file names")
        files = sorted(set(weight_map.values()))
    weights: dict[str, torch.Tensor] = {}
    needed, name = 0, files[0]
    try:
        for name in files:
            needed += _loaded_bytes(folder / name)
        check_memory(needed, folder)
        for name in files:
            weights.update(load_file(str(folder / name)))
    except (OSError, SafetensorError) as error:
        raise LmforgeError(
            f"{folder / name}: cannot read weights ({error}); the file may be missing or truncated"
        ) from None
    return {k: v.float() for k, v in weights.items()}


SAFETENSORS_ITEM_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}


def _loaded_bytes(path: Path) -> int:
    """Memory `read_safetensors` takes for one file, from the shapes in its header: each tensor as
    stored, plus an fp32 copy of those stored in other types."""
    total = 0
    with safe_open(str(path), framework="pt") as file:
        for name in file.keys():
            part = file.get_slice(name)
            elements, dtype = math.prod(part.get_shape()), part.get_dtype()
            total += elements * (SAFETENSORS_ITEM_BYTES.get(dtype, 1) + (0 if dtype == "F32" else 4))
    return total


def _layer_tensors(config: ModelConfig, family: str) -> list[tuple[str, list[str]]]:
    """(our name, HF names) of each tensor of one layer (under blocks.{i}. and model.layers.{i}.) of a
    Llama-like family; several HF names are concatenated, in order, into ours (q/k/v, gate/up)."""
    qkv = ["self_attn.qkv_proj"] if family == "phi3" else ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    up = ["mlp.gate_up_proj"] if family == "phi3" else ["mlp.gate_proj", "mlp.up_proj"]
    tensors = [
        ("attention_norm.weight", ["input_layernorm.weight"]),
        ("attention.qkv.weight", [name + ".weight" for name in qkv]),
        ("attention.out.weight", ["self_attn.o_proj.weight"]),
        ("mlp.up.weight", [name + ".weight" for name in up]),
        ("mlp.down.weight", ["mlp.down_proj.weight"]),
    ]
    if family == "qwen2":  # q/k/v biases, no output bias
        tensors.append(("attention.qkv.bias", [name + ".bias" for name in qkv]))
    if config.qk_norm:
        tensors += [("attention.q_norm.weight", ["self_attn.q_norm.weight"])]
        tensors += [("attention.k_norm.weight", ["self_attn.k_norm.weight"])]
    if family == "gemma3":  # its post_attention_layernorm is on the attention's output; the MLP's norm is "pre"
        tensors += [
            ("attention_post_norm.weight", ["post_attention_layernorm.weight"]),
            ("mlp_norm.weight", ["pre_feedforward_layernorm.weight"]),
            ("mlp_post_norm.weight", ["post_feedforward_layernorm.weight"]),
        ]
    else:
        tensors.append(("mlp_norm.weight", ["post_attention_layernorm.weight"]))
    return tensors


def _gemma_norm_offset(family: str, name: str) -> float:
    """What HF's weight of RMSNorm `name` lacks of ours: Gemma's RMSNorm scales by (1 + w) where ours scales
    by w, so ours hold 1 + w (in fp32 the very sum HF's forward computes, so the logits are exact)."""
    return 1.0 if family == "gemma3" and name.endswith("norm.weight") else 0.0


def _llama_weights(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    hf = {k.removeprefix("model."): v for k, v in hf.items()}
    family = config.architecture or "llama"
    weights = {"token_embedding.weight": hf.pop("embed_tokens.weight"), "final_norm.weight": hf.pop("norm.weight")}
    if not config.tie_embeddings:
        weights["lm_head.weight"] = hf.pop("lm_head.weight")
    for i in range(config.n_layers):
        for ours, theirs in _layer_tensors(config, family):
            weights[f"blocks.{i}.{ours}"] = torch.cat([hf.pop(f"layers.{i}.{name}") for name in theirs])
    for name in weights:
        weights[name] = weights[name] + _gemma_norm_offset(family, name)
    return weights


# GPT-2 uses Conv1D layers: weights stored (in, out), the transpose of nn.Linear's.
_GPT2_LAYER = [
    ("ln_1", "attention_norm", False),
    ("ln_2", "mlp_norm", False),
    ("attn.c_attn", "attention.qkv", True),
    ("attn.c_proj", "attention.out", True),
    ("mlp.c_fc", "mlp.up", True),
    ("mlp.c_proj", "mlp.down", True),
]


def _gpt2_weights(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    hf = {
        k.removeprefix("transformer."): v for k, v in hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))
    }
    weights = {
        "token_embedding.weight": hf.pop("wte.weight"),
        "position_embedding.weight": hf.pop("wpe.weight"),
        "final_norm.weight": hf.pop("ln_f.weight"),
        "final_norm.bias": hf.pop("ln_f.bias"),
    }
    if not config.tie_embeddings:
        weights["lm_head.weight"] = hf.pop("lm_head.weight")
    for i in range(config.n_layers):
        for theirs, ours, transposed in _GPT2_LAYER:
            weight = hf.pop(f"h.{i}.{theirs}.weight")
            weights[f"blocks.{i}.{ours}.weight"] = weight.t().contiguous() if transposed else weight
            weights[f"blocks.{i}.{ours}.bias"] = hf.pop(f"h.{i}.{theirs}.bias")
    return weights


def load_hf(folder: str | Path) -> tuple[Transformer, Tokenizer]:
    """Model (fp32, eval mode) and tokenizer from an HF folder."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise LmforgeError(f"{folder}: no config.json; not an HF model folder")
    values = read_json_object(config_path)
    config = read_config(values, config_path)
    hf = read_safetensors(folder)
    try:
        weights = _llama_weights(hf, config) if config.positions == "rope" else _gpt2_weights(hf, config)
    except KeyError as error:
        raise LmforgeError(
            f"{folder}: weight {error.args[0]!r} is missing for a {values['model_type']} model"
        ) from None
    check_dimensions(config, weights, config_path, LLAMA_KEYS if config.positions == "rope" else GPT2_KEYS)
    try:
        model = Transformer.from_state_dict(config, weights)
    except ValueError as error:
        raise LmforgeError(f"{folder}: {error}") from None

    return model.eval(), read_hf_tokenizer(folder)


def read_hf_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer of an HF folder: tokenizer.json, with what tokenizer_config.json, chat_template.jinja
    (newer transformers saves the template there) and generation_config.json's eos list say about it."""
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.exists():
        raise LmforgeError(f"{folder}: no tokenizer.json")
    try:
        hf_tokenizer = HFTokenizer.from_file(str(tokenizer_path))
    except Exception as error:  # the tokenizers library raises a bare Exception on a bad file
        raise LmforgeError(f"{tokenizer_path}: not a readable tokenizer ({error})") from None
    specials = [t.content for t in hf_tokenizer.get_added_tokens_decoder().values() if t.special]
    tokenizer = BPETokenizer(hf_tokenizer, specials)
    settings_path = folder / "tokenizer_config.json"
    settings = read_json_object(settings_path) if settings_path.exists() else {}
    for name in ("bos_token", "eos_token", "pad_token"):
        token = settings.get(name)
        setattr(tokenizer, name, token.get("content") if isinstance(token, dict) else token)
    template = settings.get("chat_template")
    if isinstance(template, list):  # older files: named templates, [{"name": "default", "template": ...}, ...]
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    tokenizer.chat_template = template if isinstance(template, str) else None
    # What tokenizer.json's post-processor puts around a text is what transformers adds (since v5 it ignores
    # tokenizer_config.json's add_bos_token/add_eos_token when there is a tokenizer.json).
    marked = hf_tokenizer.post_process(hf_tokenizer.encode("", add_special_tokens=False)).ids
    tokenizer.add_bos_token = bool(marked) and marked[0] == tokenizer.bos_id
    tokenizer.add_eos_token = bool(marked) and marked[-1] == tokenizer.eos_id
    generation_path = folder / GENERATION_CONFIG
    if generation_path.exists():
        eos_ids = read_json_object(generation_path).get("eos_token_id")
        eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
        names = (hf_tokenizer.id_to_token(i) for i in eos_ids if isinstance(i, int) and not isinstance(i, bool))
        tokenizer.end_of_turn_tokens = tuple(name for name in names if name and name != tokenizer.eos_token)
    return tokenizer


GENERATION_CONFIG = "generation_config.json"
GENERATION_SAMPLING_KEYS = {field: field for field in SAMPLING_FIELDS}  # transformers uses our names


def read_generation_config(folder: str | Path) -> dict | None:
    """The sampling settings `folder/generation_config.json` names, as SamplingConfig fields (None
    without the file). do_sample=false means greedy (temperature 0), as transformers decodes it; sampling
    values named without do_sample are taken as meant (transformers would warn and decode greedily)."""
    path = Path(folder) / GENERATION_CONFIG
    if not path.exists():
        return None
    values = read_json_object(path)
    settings = sampling_settings(values, path, GENERATION_SAMPLING_KEYS)
    if boolean(values, "do_sample", path, default=True) is False:
        settings["temperature"] = 0.0
    return settings


def _hf_rope(theta: float, scaling: dict | None, path: str) -> dict:
    """HF's rope parameters for our theta and rope_scaling."""
    if scaling is not None and scaling["rope_type"] == "factors":
        raise LmforgeError(
            f"{path}: this model's RoPE has per-frequency factors (a GGUF's rope_freqs), which config.json cannot "
            f"hold; export it as GGUF instead"
        )
    return {"rope_theta": theta, "rope_type": "default"} | (scaling or {})


def hf_config(config: ModelConfig, tokenizer: Tokenizer) -> dict:
    ids = {
        f"{name}_token_id": tokenizer.token_to_id(getattr(tokenizer, f"{name}_token") or "")
        for name in ("bos", "eos", "pad")
    }
    try:
        family = config.require_family("HF export")
    except ValueError as error:
        raise LmforgeError(str(error)) from None
    model_type, class_name = EXPORTED_AS[family]
    if family == "gpt2":
        return {
            "architectures": [class_name],
            "model_type": model_type,
            "vocab_size": config.vocab_size,
            "n_positions": config.block_size,
            "n_ctx": config.block_size,
            "n_layer": config.n_layers,
            "n_head": config.n_heads,
            "n_embd": config.d_model,
            "n_inner": config.mlp_hidden,
            "layer_norm_epsilon": config.norm_eps,
            "activation_function": "gelu" if config.mlp == "gelu" else "gelu_new",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": config.tie_embeddings,
            "torch_dtype": "float32",
            **ids,
        }
    rope = _hf_rope(config.rope_theta, config.rope_scaling, "HF export")
    values = {
        "architectures": [class_name],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.block_size,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_hidden,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",
        **ids,
    }
    window = config.sliding_window
    layer_types = [
        "sliding_attention" if config.is_sliding(layer) else "full_attention" for layer in range(config.n_layers)
    ]
    if family in ("mistral", "phi3"):
        values["sliding_window"] = window
    if family == "phi3":
        values |= {"original_max_position_embeddings": config.block_size, "partial_rotary_factor": 1.0}
        values |= {"resid_pdrop": 0.0, "embd_pdrop": 0.0}
    if family in ("qwen2", "qwen3"):
        # use_sliding_window with max_window_layers as transformers derives layer_types, which it then reads
        values |= {"use_sliding_window": window is not None, "sliding_window": window, "layer_types": layer_types}
        values["max_window_layers"] = next((i for i, kind in enumerate(layer_types) if kind != "full_attention"), 0)
    if family == "gemma3":
        local = rope if config.rope_local_theta is None else _hf_rope(config.rope_local_theta, None, "HF export")
        scale = config.attention_scale or config.head_dim**-0.5
        values |= {
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_act": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": round(scale**-2),  # an int to transformers (head_dim, 256...)
            "final_logit_softcapping": config.logit_softcap,
            "attn_logit_softcapping": None,
            # Gemma 3 always names a window; with none, every layer is full and the value is unused
            "sliding_window": window or config.block_size,
            "layer_types": layer_types,
            "rope_local_base_freq": local["rope_theta"],
            "rope_parameters": {"full_attention": rope, "sliding_attention": local},
        }
    return values


def hf_weights(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under HF's names for its family (fp32, contiguous), as `save_hf` writes them."""
    config = model.config
    family = config.require_family("HF export")
    state = {name: as_float(weight).contiguous() for name, weight in model_weights(model).items()}
    weights: dict[str, torch.Tensor] = {}
    if family != "gpt2":
        split_sizes = {
            3: [config.n_heads * config.head_dim, config.kv_heads * config.head_dim, config.kv_heads * config.head_dim],
            2: [config.mlp_hidden, config.mlp_hidden],
        }
        weights["model.embed_tokens.weight"] = state["token_embedding.weight"]
        weights["model.norm.weight"] = state["final_norm.weight"] - _gemma_norm_offset(family, "final_norm.weight")
        for i in range(config.n_layers):
            for ours, theirs in _layer_tensors(config, family):
                tensor = state.get(f"blocks.{i}.{ours}")
                if tensor is None:  # a Qwen2 file always has q/k/v biases: zero where ours has none
                    tensor = torch.zeros((config.n_heads + 2 * config.kv_heads) * config.head_dim)
                tensor = tensor - _gemma_norm_offset(family, ours)
                parts = tensor.split(split_sizes[len(theirs)]) if len(theirs) > 1 else [tensor]
                weights.update({f"model.layers.{i}.{name}": part for name, part in zip(theirs, parts)})
    else:
        weights.update(
            {
                "transformer.wte.weight": state["token_embedding.weight"],
                "transformer.wpe.weight": state["position_embedding.weight"],
                "transformer.ln_f.weight": state["final_norm.weight"],
                "transformer.ln_f.bias": state["final_norm.bias"],
            }
        )
        for i in range(config.n_layers):
            for theirs, ours, transposed in _GPT2_LAYER:
                weight = state[f"blocks.{i}.{ours}.weight"]
                weights[f"transformer.h.{i}.{theirs}.weight"] = weight.t().contiguous() if transposed else weight
                weights[f"transformer.h.{i}.{theirs}.bias"] = state[f"blocks.{i}.{ours}.bias"]
    if not config.tie_embeddings:
        weights["lm_head.weight"] = state["lm_head.weight"]
    return {name: tensor.contiguous() for name, tensor in weights.items()}


# safetensors files of at most this size each (transformers' own default shard size is 5 GB; 2 GB keeps
# each file's write and read within 32-bit tools' limits and loads one shard at a time in less memory)
SHARD_BYTES = 2 * 1024**3


def safetensors_files(weights: dict[str, torch.Tensor], shard_bytes: int = SHARD_BYTES) -> dict[str, dict]:
    """File name -> the weights it holds: model.safetensors, or when they are bigger than `shard_bytes`,
    model-0000i-of-0000n.safetensors shards in order (a tensor bigger than a shard has one of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in weights.items():
        tensor_bytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + tensor_bytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor_bytes
    if len(shards) == 1:
        return {"model.safetensors": shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": shard for i, shard in enumerate(shards)}


def save_hf(model: Transformer, tokenizer: Tokenizer, folder: str | Path, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write an HF folder: config.json, model.safetensors (or shards of `shard_bytes` with their
    model.safetensors.index.json), tokenizer.json, tokenizer_config.json, generation_config.json."""
    config = model.config
    values = hf_config(config, tokenizer)
    files = safetensors_files(hf_weights(model), shard_bytes)
    writers = {
        name: (lambda path, shard=shard: save_file(shard, str(path), metadata={"format": "pt"}))
        for name, shard in files.items()
    }
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for f in files.values() for t in f.values())},
            "weight_map": {name: file for file, shard in files.items() for name in shard},
        }
        writers[SAFETENSORS_INDEX] = lambda path: path.write_text(json.dumps(index, indent=2))

    hf_tokenizer = tokenizer.to_hf() if isinstance(tokenizer, CharTokenizer) else tokenizer.hf
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.block_size,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": tokenizer.add_bos_token,
        "add_eos_token": tokenizer.add_eos_token,
    }
    if tokenizer.chat_template:
        settings["chat_template"] = tokenizer.chat_template
    generation = {k: values[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if values.get(k) is not None}
    end_of_turn_ids = [tokenizer.token_to_id(token) for token in tokenizer.end_of_turn_tokens]
    if end_of_turn_ids and "eos_token_id" in generation:  # transformers stops at any id of the list
        generation["eos_token_id"] = [generation["eos_token_id"], *(i for i in end_of_turn_ids if i is not None)]
    stale = _weight_files(Path(folder))
    # config.json last: it is what marks a folder as a model to transformers and to `lmforge.load`.
    folder = write_files_atomically(
        folder,
        writers
        | {
            "tokenizer.json": lambda path: hf_tokenizer.save(str(path)),
            "tokenizer_config.json": lambda path: path.write_text(json.dumps(settings, indent=2)),
            GENERATION_CONFIG: lambda path: path.write_text(json.dumps(generation, indent=2)),
            "config.json": lambda path: path.write_text(json.dumps(values, indent=2)),
        },
    )
    # transformers would take a stale model.safetensors over new shards, and a stale index over a new single file
    for name in stale - set(writers):
        (folder / name).unlink(missing_ok=True)
    return folder


def _weight_files(folder: Path) -> set[str]:
    """The weight files (and index) of an HF folder as it is: what a new export may leave stale."""
    names = {name for name in ("model.safetensors", SAFETENSORS_INDEX) if (folder / name).exists()}
    if SAFETENSORS_INDEX in names:
        try:
            weight_map = json.loads((folder / SAFETENSORS_INDEX).read_text()).get("weight_map", {})
            names |= {name for name in weight_map.values() if isinstance(name, str) and "/" not in name}
        except (OSError, ValueError, AttributeError):
            pass  # an unreadable index is replaced or removed all the same
    return names
