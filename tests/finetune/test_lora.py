"""LoRA: the trainable count, merge == unmerged outputs, unmerge restores, adapters save/load alone."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.finetune.lora import (
    ALL_TARGETS,
    LoraConfig,
    LoraLinear,
    apply_lora,
    count_trainable,
    load_adapter,
    lora_layers,
    merge_lora,
    remove_lora,
    save_adapter,
    unmerge_lora,
)
from lmforge.inference.quantize import quantize_model
from lmforge.model import ModelConfig, Transformer
from lmforge.settings import LLAMA_SWITCHES

CONFIG = ModelConfig(
    vocab_size=50, block_size=32, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, **LLAMA_SWITCHES,
)  # fmt: skip


def base_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(CONFIG).eval()


def randomize_adapters(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        with torch.no_grad():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=generator) * 0.1)


TOKENS = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))


def test_only_adapters_train_and_their_count_is_rank_times_in_plus_out():
    model = apply_lora(base_model(), LoraConfig(rank=4, targets=("qkv", "out", "up", "down")))
    qkv_out = (CONFIG.n_heads + 2 * CONFIG.kv_heads) * CONFIG.head_dim  # 32 + 2 * 16 = 64
    per_layer = 4 * (32 + qkv_out) + 4 * (32 + 32) + 4 * (32 + 2 * CONFIG.mlp_hidden) + 4 * (CONFIG.mlp_hidden + 32)
    assert count_trainable(model) == CONFIG.n_layers * per_layer
    assert all(("lora_" in name) == p.requires_grad for name, p in model.named_parameters())
    assert sum(1 for _ in lora_layers(model)) == 4 * CONFIG.n_layers


def test_a_fresh_adapter_changes_nothing_and_merge_equals_unmerged():
    reference = base_model()(TOKENS)[0]
    model = apply_lora(base_model(), LoraConfig(rank=4, alpha=8))
    assert torch.equal(model(TOKENS)[0], reference)  # B starts at zero
    randomize_adapters(model)
    base_weight = model.blocks[0].attention.qkv.base.weight.detach().clone()
    unmerged = model(TOKENS)[0]
    assert not torch.allclose(unmerged, reference, atol=1e-4)
    merge_lora(model)
    assert torch.allclose(model(TOKENS)[0], unmerged, atol=1e-5)
    layer = model.blocks[0].attention.qkv
    assert torch.allclose(layer.base.weight, base_weight + (8 / 4) * layer.lora_b @ layer.lora_a, atol=1e-6)
    unmerge_lora(model)
    assert torch.allclose(model.blocks[0].attention.qkv.base.weight, base_weight, atol=1e-6)
    assert torch.allclose(model(TOKENS)[0], unmerged, atol=1e-5)


def test_adapter_saves_alone_and_loads_onto_a_fresh_base(tmp_path):
    model = apply_lora(base_model(), LoraConfig(rank=2, dropout=0.5, targets=("qkv", "down")))  # eval: no dropout
    randomize_adapters(model)
    expected = model(TOKENS)[0]
    save_adapter(model, tmp_path / "adapter", base_model="tiny")
    weights = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert all(".lora_a" in k or ".lora_b" in k for k in weights) and len(weights) == 2 * 2 * CONFIG.n_layers
    restored = load_adapter(base_model(), tmp_path / "adapter")
    assert torch.allclose(restored(TOKENS)[0], expected, atol=1e-6)

    other = Transformer(ModelConfig(**{**CONFIG.to_dict(), "d_model": 64}))
    with pytest.raises(LmforgeError, match="shape"):
        load_adapter(other, tmp_path / "adapter")


def test_a_training_step_moves_only_the_adapters():
    model = apply_lora(base_model(), LoraConfig(rank=4))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    _, loss = model(TOKENS[:, :-1], TOKENS[:, 1:])
    loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any(name.endswith("lora_b") for name in changed)


def test_remove_lora_leaves_plain_linear_layers_with_the_same_outputs():
    model = apply_lora(base_model(), LoraConfig(rank=4))
    randomize_adapters(model)
    expected = model(TOKENS)[0]
    remove_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert type(model.blocks[0].attention.qkv) is nn.Linear
    assert torch.allclose(model(TOKENS)[0], expected, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())


def test_adapters_run_over_a_quantized_base_but_do_not_merge():
    model = quantize_model(base_model(), bits=8)
    reference = model(TOKENS)[0]
    apply_lora(model, LoraConfig(rank=4))
    assert torch.allclose(model(TOKENS)[0], reference)
    randomize_adapters(model)
    assert not torch.allclose(model(TOKENS)[0], reference, atol=1e-4)
    with pytest.raises(LmforgeError, match="cannot merge"):
        merge_lora(model)


def test_bad_configs_are_named():
    with pytest.raises(LmforgeError, match="rank must be >= 1"):
        LoraConfig(rank=0)
    with pytest.raises(LmforgeError, match="no layer matches"):
        apply_lora(base_model(), LoraConfig(targets=("q_proj",)))
    model = apply_lora(base_model(), LoraConfig())
    with pytest.raises(LmforgeError, match="already has LoRA"):
        apply_lora(model, LoraConfig())


def test_generation_over_a_quantized_base_with_an_adapter_matches_the_plain_forward():
    from lmforge.inference.engine import DecodePlan
    from lmforge.inference.generate import SamplingConfig, generate_tokens

    model = quantize_model(base_model(), bits=8)
    apply_lora(model, LoraConfig(rank=4))
    randomize_adapters(model)
    assert not DecodePlan.fits(model)  # the native step cannot run LoRA wrappers: the model's forward does
    prompt = TOKENS[0, :5].tolist()
    produced = list(generate_tokens(model, prompt, SamplingConfig(max_new_tokens=6, temperature=0.0)))
    expected = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            expected.append(int(model(torch.tensor([expected]))[0][0, -1].argmax()))
    assert produced == expected[5:]


@pytest.mark.parametrize(
    "switches",
    [
        dict(qk_norm=True, d_head=16),  # Qwen3
        dict(mlp="geglu", qk_norm=True, post_norms=True, scale_embeddings=True, d_head=16, sliding_window=4,
             layer_types=["sliding", "full"], rope_local_theta=10000.0, attention_scale=0.2),  # Gemma 3
    ],
    ids=["qwen3", "gemma3"],
)  # fmt: skip
def test_lora_learns_on_the_new_families(switches):
    """The same four target layers exist in every family; fitting one repeated batch lowers the loss."""
    torch.manual_seed(0)
    model = apply_lora(Transformer(replace(CONFIG, **switches)), LoraConfig(rank=4, targets=ALL_TARGETS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        _, loss = model(TOKENS[:, :-1], TOKENS[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses[-5:])
    assert len(list(lora_layers(model))) == 4 * CONFIG.n_layers
