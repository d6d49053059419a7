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

LLAMA_TYPES = ("llama", "mistral")


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


def read_config(values: dict, path: Path) -> ModelConfig:
    """Our config from config.json's values, every field checked (type, range, divisibility) before use."""
    model_type = values.get("model_type")
    if model_type in LLAMA_TYPES:
        rope = values.get("rope_parameters") or {}
        scaling = values.get("rope_scaling")
        if not isinstance(rope, dict) or not isinstance(scaling, (dict, type(None))):
            raise LmforgeError(f"{path}: rope_parameters and rope_scaling must be JSON objects")
        scaling = scaling or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            raise LmforgeError(f"{path}: rope scaling {scaling} is not supported")
        if values.get("attention_bias") or values.get("mlp_bias"):
            raise LmforgeError(f"{path}: Llama models with attention/MLP biases are not supported")
        sizes = {
            ours: integer(values, theirs, path, default=2048 if ours == "block_size" else MISSING)
            for ours, theirs in LLAMA_KEYS.items()
            if ours != "n_kv_heads"
        }
        sizes["n_kv_heads"] = integer(values, "num_key_value_heads", path, default=sizes["n_heads"])
        heads, width = sizes["n_heads"], sizes["d_model"]
        head_dim = integer(values, "head_dim", path, default=width // heads)
        if width % heads == 0 and head_dim != width // heads:  # (not divisible: model_config says so)
            raise LmforgeError(f"{path}: head_dim != hidden_size / num_attention_heads is not supported")
        theta = positive_number(rope, "rope_theta", path, positive_number(values, "rope_theta", path, 10000.0))
        return model_config(
            path,
            LLAMA_KEYS,
            **sizes,
            norm="rmsnorm",
            norm_eps=positive_number(values, "rms_norm_eps", path, 1e-6),
            mlp="swiglu",
            positions="rope",
            rope_theta=theta,
            bias=False,
            tie_embeddings=boolean(values, "tie_word_embeddings", path, False),
        )
    if model_type == "gpt2":
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
    raise LmforgeError(f"{path}: model_type {model_type!r} is not supported (supported: llama, mistral, gpt2)")


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of the folder's safetensors file(s), as fp32, after checking that they fit in memory."""
    index = folder / "model.safetensors.index.json"
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


def _llama_weights(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    hf = {k.removeprefix("model."): v for k, v in hf.items()}
    weights = {"token_embedding.weight": hf.pop("embed_tokens.weight"), "final_norm.weight": hf.pop("norm.weight")}
    if not config.tie_embeddings:
        weights["lm_head.weight"] = hf.pop("lm_head.weight")
    for i in range(config.n_layers):
        theirs, ours = f"layers.{i}.", f"blocks.{i}."
        weights[ours + "attention_norm.weight"] = hf.pop(theirs + "input_layernorm.weight")
        weights[ours + "mlp_norm.weight"] = hf.pop(theirs + "post_attention_layernorm.weight")
        weights[ours + "attention.qkv.weight"] = torch.cat(
            [hf.pop(f"{theirs}self_attn.{p}_proj.weight") for p in "qkv"]
        )
        weights[ours + "attention.out.weight"] = hf.pop(theirs + "self_attn.o_proj.weight")
        weights[ours + "mlp.up.weight"] = torch.cat(
            [hf.pop(theirs + "mlp.gate_proj.weight"), hf.pop(theirs + "mlp.up_proj.weight")]
        )
        weights[ours + "mlp.down.weight"] = hf.pop(theirs + "mlp.down_proj.weight")
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


def hf_config(config: ModelConfig, tokenizer: Tokenizer) -> dict:
    ids = {
        f"{name}_token_id": tokenizer.token_to_id(getattr(tokenizer, f"{name}_token") or "")
        for name in ("bos", "eos", "pad")
    }
    try:
        family = config.require_family("HF export")
    except ValueError as error:
        raise LmforgeError(str(error)) from None
    if family == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.block_size,
            "num_hidden_layers": config.n_layers,
            "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.kv_heads,
            "hidden_size": config.d_model,
            "intermediate_size": config.mlp_hidden,
            "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta,
            "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "head_dim": config.head_dim,
            "tie_word_embeddings": config.tie_embeddings,
            "torch_dtype": "float32",
            **ids,
        }
    return {  # the GPT-2 family
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
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


def save_hf(model: Transformer, tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Write an HF folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json."""
    config = model.config
    values = hf_config(config, tokenizer)
    state = {name: as_float(weight).contiguous() for name, weight in model_weights(model).items()}
    weights: dict[str, torch.Tensor] = {}
    if values["model_type"] == "llama":
        weights["model.embed_tokens.weight"] = state["token_embedding.weight"]
        weights["model.norm.weight"] = state["final_norm.weight"]
        for i in range(config.n_layers):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            q, k, v = state[ours + "attention.qkv.weight"].split(
                [config.n_heads * config.head_dim, config.kv_heads * config.head_dim, config.kv_heads * config.head_dim]
            )
            gate, up = state[ours + "mlp.up.weight"].chunk(2)
            weights.update(
                {
                    theirs + "input_layernorm.weight": state[ours + "attention_norm.weight"],
                    theirs + "post_attention_layernorm.weight": state[ours + "mlp_norm.weight"],
                    theirs + "self_attn.q_proj.weight": q,
                    theirs + "self_attn.k_proj.weight": k,
                    theirs + "self_attn.v_proj.weight": v,
                    theirs + "self_attn.o_proj.weight": state[ours + "attention.out.weight"],
                    theirs + "mlp.gate_proj.weight": gate,
                    theirs + "mlp.up_proj.weight": up,
                    theirs + "mlp.down_proj.weight": state[ours + "mlp.down.weight"],
                }
            )
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
    weights = {k: v.contiguous() for k, v in weights.items()}
    # config.json last: it is what marks a folder as a model to transformers and to `lmforge.load`.
    return write_files_atomically(
        folder,
        {
            "model.safetensors": lambda path: save_file(weights, str(path), metadata={"format": "pt"}),
            "tokenizer.json": lambda path: hf_tokenizer.save(str(path)),
            "tokenizer_config.json": lambda path: path.write_text(json.dumps(settings, indent=2)),
            GENERATION_CONFIG: lambda path: path.write_text(json.dumps(generation, indent=2)),
            "config.json": lambda path: path.write_text(json.dumps(values, indent=2)),
        },
    )
