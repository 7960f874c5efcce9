"""A tiny LLaMA-shaped language model in plain torch, for tests, examples and quick benchmarks.

It has what routing and the optimizers care about: a token embedding, RMSNorm gains, attention
q/k/v/o and SwiGLU gate/up/down projections of several shapes, and an LM head (tied or not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyLM", "tiny_batch"]


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.RMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)
        self.mlp_norm = nn.RMSNorm(dim)
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLM(nn.Module):
    """Decoder-only LM: ``embed_tokens`` -> blocks -> ``norm`` -> ``lm_head`` (optionally tied)."""

    def __init__(self, vocab: int = 64, dim: int = 32, layers: int = 2, heads: int = 4, hidden: int = 48,
                 tie: bool = False, bias: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(_Block(dim, heads, hidden, bias) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed_tokens.weight

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))


def tiny_batch(seed: int, vocab: int = 64, batch: int = 4, length: int = 17) -> torch.Tensor:
    """A reproducible batch of token ids (with some structure, so the loss can fall)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    step = torch.randint(1, 4, (batch, 1), generator=g)
    noise = (torch.rand(batch, length, generator=g) < 0.1) * torch.randint(0, vocab, (batch, length), generator=g)
    return (start + step * torch.arange(length) + noise) % vocab
