"""HF transformers folders (config.json + safetensors + tokenizer.json): Llama and GPT-2 families.

Reading maps HF names onto ours (q/k/v and gate/up are fused here); writing does the reverse,
so `transformers.AutoModelForCausalLM.from_pretrained` loads what we export.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import BPETokenizer, CharTokenizer, Tokenizer

LLAMA_TYPES = ("llama", "mistral")


def read_config(values: dict, path: Path) -> ModelConfig:
    model_type = values.get("model_type")
    if model_type in LLAMA_TYPES:
        rope = values.get("rope_parameters") or {}
        scaling = values.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            raise LmforgeError(f"{path}: rope scaling {scaling} is not supported")
        if values.get("attention_bias") or values.get("mlp_bias"):
            raise LmforgeError(f"{path}: Llama models with attention/MLP biases are not supported")
        heads = values["num_attention_heads"]
        if values.get("head_dim") not in (None, values["hidden_size"] // heads):
            raise LmforgeError(f"{path}: head_dim != hidden_size / num_attention_heads is not supported")
        return ModelConfig(
            vocab_size=values["vocab_size"],
            block_size=values.get("max_position_embeddings", 2048),
            n_layers=values["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=values.get("num_key_value_heads") or heads,
            d_model=values["hidden_size"],
            d_mlp=values["intermediate_size"],
            norm="rmsnorm",
            norm_eps=values.get("rms_norm_eps", 1e-6),
            mlp="swiglu",
            positions="rope",
            rope_theta=float(rope.get("rope_theta", values.get("rope_theta", 10000.0))),
            bias=False,
            tie_embeddings=bool(values.get("tie_word_embeddings", False)),
        )
    if model_type == "gpt2":
        activation = values.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise LmforgeError(f"{path}: GPT-2 activation {activation!r} is not supported")
        return ModelConfig(
            vocab_size=values["vocab_size"],
            block_size=values.get("n_positions", 1024),
            n_layers=values["n_layer"],
            n_heads=values["n_head"],
            d_model=values["n_embd"],
            d_mlp=values.get("n_inner") or 4 * values["n_embd"],
            norm="layernorm",
            norm_eps=values.get("layer_norm_epsilon", 1e-5),
            mlp="gelu" if activation == "gelu" else "gelu_tanh",
            positions="learned",
            bias=True,
            tie_embeddings=bool(values.get("tie_word_embeddings", True)),
        )
    raise LmforgeError(f"{path}: model_type {model_type!r} is not supported (supported: llama, mistral, gpt2)")


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            weights.update(load_file(str(folder / name)))
        except (OSError, SafetensorError) as error:
            raise LmforgeError(
                f"{folder / name}: cannot read weights ({error}); the file may be missing or truncated"
            ) from None
    return {k: v.float() for k, v in weights.items()}


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
    from tokenizers import Tokenizer as HFTokenizer

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise LmforgeError(f"{folder}: no config.json; not an HF model folder")
    values = json.loads(config_path.read_text())
    config = read_config(values, config_path)
    hf = read_safetensors(folder)
    try:
        weights = _llama_weights(hf, config) if config.positions == "rope" else _gpt2_weights(hf, config)
    except KeyError as error:
        raise LmforgeError(
            f"{folder}: weight {error.args[0]!r} is missing for a {values['model_type']} model"
        ) from None
    try:
        model = Transformer.from_state_dict(config, weights)
    except ValueError as error:
        raise LmforgeError(f"{folder}: {error}") from None

    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.exists():
        raise LmforgeError(f"{folder}: no tokenizer.json")
    hf_tokenizer = HFTokenizer.from_file(str(tokenizer_path))
    specials = [t.content for t in hf_tokenizer.get_added_tokens_decoder().values() if t.special]
    tokenizer = BPETokenizer(hf_tokenizer, specials)
    settings_path = folder / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text()) if settings_path.exists() else {}
    for name in ("bos_token", "eos_token", "pad_token"):
        token = settings.get(name)
        setattr(tokenizer, name, token["content"] if isinstance(token, dict) else token)
    tokenizer.chat_template = settings.get("chat_template")
    if tokenizer.chat_template is None and (folder / "chat_template.jinja").exists():
        tokenizer.chat_template = (folder / "chat_template.jinja").read_text()
    return model.eval(), tokenizer


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
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
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

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    (folder / "config.json").write_text(json.dumps(values, indent=2))
    hf_tokenizer = tokenizer.to_hf() if isinstance(tokenizer, CharTokenizer) else tokenizer.hf
    hf_tokenizer.save(str(folder / "tokenizer.json"))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.block_size,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "clean_up_tokenization_spaces": False,
    }
    if tokenizer.chat_template:
        settings["chat_template"] = tokenizer.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    generation = {k: values[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if values.get(k) is not None}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return folder
