"""The decoding step on CPU: one new token per sequence through native kernels.

`model.forward` stays the reference and does prefill (many tokens: PyTorch's batched
matmuls are the right tool). Decoding feeds one token per sequence, where PyTorch spends
more time dispatching ~40 small operators per layer than computing; `decode_step` runs the
same maths as `Transformer.hidden_states` + LM head with a few native calls per layer. It
covers Llama-family models (RMSNorm, RoPE, SwiGLU, no biases) on CPU in fp32 activations;
`supports` says when, and callers fall back to the model itself otherwise.
"""

from __future__ import annotations

import torch

from lmforge import kernels
from lmforge.model import KVCache, Transformer


def supports(model: Transformer) -> bool:
    config = model.config
    return (
        kernels.available()
        and config.norm == "rmsnorm"
        and config.positions == "rope"
        and config.mlp == "swiglu"
        and not config.bias
        and config.n_heads % config.kv_heads == 0
        and model.rope_cos.device.type == "cpu"
        and model.rope_cos.dtype == torch.float32
        and model.final_norm.weight.dtype == torch.float32
    )


def decode_step(
    model: Transformer,
    tokens: torch.Tensor,
    cache: KVCache,
    positions: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token logits (B, vocab) for one new token per row, tokens (B, 1).

    Positions and cache rows as in `Transformer.forward`: aligned at `cache.length` when
    `positions` is None (and the cache then advances), else per row.
    """
    config = model.config
    batch = tokens.shape[0]
    aligned = positions is None
    if aligned:
        positions = torch.full((batch,), cache.length, dtype=torch.long)
    if slots is None:
        slots = torch.arange(batch)
    position_limit = min(cache.max_length, config.block_size)
    if int(positions.max()) >= position_limit:
        raise ValueError(f"position {int(positions.max())} does not fit the cache/context of {position_limit}")
    positions, slots = positions.contiguous(), slots.contiguous()
    x = model.token_embedding(tokens.reshape(batch)).contiguous()
    blocks = model.blocks
    # Modules' forward() is called directly: nn.Module.__call__'s hook handling costs more
    # than some of these kernels.
    h = kernels.rms_norm(x, blocks[0].attention_norm.weight, blocks[0].attention_norm.eps)
    for layer, block in enumerate(blocks):
        attention = block.attention
        qkv = attention.qkv.forward(h)
        y = kernels.attention_decode(
            qkv, config.n_heads, config.kv_heads, slots, positions, cache.keys[layer], cache.values[layer],
            model.rope_cos, model.rope_sin,
        )  # fmt: skip
        h = kernels.add_rms_norm(x, attention.out.forward(y), block.mlp_norm.weight, block.mlp_norm.eps)
        down = block.mlp.down.forward(kernels.silu_mul(block.mlp.up.forward(h)))
        following = blocks[layer + 1].attention_norm if layer + 1 < len(blocks) else model.final_norm
        h = kernels.add_rms_norm(x, down, following.weight, following.eps)
    if aligned:
        cache.length += 1
    return model.lm_head(h).float()
