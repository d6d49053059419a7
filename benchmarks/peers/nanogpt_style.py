"""A nanoGPT-style GPT, written from its published design, as the throughput peer.

Matches nanoGPT's model as its CPU recipe runs it (train.py's defaults, shakespeare_char's
config, the README's CPU overrides): learned positions; no biases, in LayerNorm or Linear
(train.py's `bias = False`, which that config keeps); fused c_attn projection; exact GELU;
scaled_dot_product_attention(is_causal=True); tied LM head; betas (0.9, 0.99); weight decay
0.1 on 2-D parameters; gradient clipping at 1.0; dropout 0, which is the identity.

AdamW gets the arguments nanoGPT gives it off CUDA: none beyond lr and betas. On CPU PyTorch
then picks its per-parameter loop, not the foreach or fused kernels.
"""

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=False)
        self.c_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, length, width))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, bias=False)
        self.attn = SelfAttention(d_model, n_heads)
        self.ln_2 = nn.LayerNorm(d_model, bias=False)
        self.c_fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(self.gelu(self.c_fc(self.ln_2(x))))


class NanoGPTStyle(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layers: int, n_heads: int, d_model: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.h = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model, bias=False)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def flops_per_token(self) -> float:
        """nanoGPT's estimate (PaLM appendix B): 6N + 12 * L * d * T, N without position embeddings."""
        parameters = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        layers, width, context = len(self.h), self.wpe.weight.shape[1], self.wpe.weight.shape[0]
        return 6 * parameters + 12 * layers * width * context

    def configure_optimizer(self, lr: float = 1e-3, fused: bool | None = None) -> torch.optim.Optimizer:
        """nanoGPT's AdamW: fused=True where it runs on CUDA, nothing (PyTorch's default) elsewhere."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=fused)
