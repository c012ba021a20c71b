"""Extra BERT encoder layer on the text features inside each DyHead block (reference §1.5.2).

Attribute names are HF BERT's, so the official ``rpn.head.dyhead_tower.{3i+1}.*`` keys load by a prefix rename
(reference §8). Initialisation is PyTorch's default: the official layer never calls BERT's ``init_weights``
(reference §1.5.2, §9.4). The ±50000 clamps are the official ``clamp_values``; the fused path (``use_sdpa``)
leaves out the score clamp, the same function whenever it would not act (see ``fusion.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CLAMP = 50000.0


def _clamp(x: Tensor) -> Tensor:
    return x.clamp(-_CLAMP, _CLAMP)


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float, use_sdpa: bool):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, hidden // heads
        # A module, not a float, so that switching every nn.Dropout off (p = 0) switches this one off too.
        self.dropout, self.use_sdpa = nn.Dropout(dropout), use_sdpa
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def _split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, text_mask: Tensor) -> Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        keep = text_mask.bool()[:, None, None, :]  # (B,1,1,T): padded keys are masked, queries are not
        p = self.dropout.p if self.training and self.dropout.training else 0.0
        if self.use_sdpa:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
        else:
            scores = _clamp(torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5)
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
            ctx = torch.matmul(F.dropout(scores.softmax(dim=-1), p, self.training), v)
        b, _, t, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)


class _SelfOutput(nn.Module):
    def __init__(self, hidden: int, dropout: float, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float, eps: float, use_sdpa: bool):
        super().__init__()
        # ``self`` is the HF attribute name (key ``attention.self.query.weight``); legal as a submodule name.
        self.add_module("self", _SelfAttention(hidden, heads, dropout, use_sdpa))
        self.output = _SelfOutput(hidden, dropout, eps)

    def forward(self, x: Tensor, text_mask: Tensor) -> Tensor:
        return self.output(getattr(self, "self")(x, text_mask), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: Tensor) -> Tensor:
        return _clamp(F.gelu(_clamp(self.dense(x))))


class _Output(nn.Module):
    def __init__(self, hidden: int, intermediate: int, dropout: float, eps: float):
        super().__init__()
        self.dense = nn.Linear(intermediate, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return _clamp(self.LayerNorm(_clamp(self.dropout(self.dense(x))) + residual))


class TextLayer(nn.Module):
    """One post-LN BERT encoder layer (self-attention + GELU FFN) on the fused text features."""

    def __init__(
        self,
        hidden: int = 768,
        heads: int = 12,
        intermediate: int = 3072,
        dropout: float = 0.1,
        eps: float = 1e-12,
        use_sdpa: bool = True,
    ):
        super().__init__()
        self.attention = _Attention(hidden, heads, dropout, eps, use_sdpa)
        self.intermediate = _Intermediate(hidden, intermediate)
        self.output = _Output(hidden, intermediate, dropout, eps)

    def forward(self, text: Tensor, text_mask: Tensor) -> Tensor:
        """text (B,T,D), text_mask (B,T) bool (True = real token) -> (B,T,D)."""
        attended = self.attention(text, text_mask)
        return self.output(self.intermediate(attended), attended)


class IdentityTextLayer(nn.Module):
    """No extra text layer (official ``DummyLayer``): returns the text features unchanged."""

    def forward(self, text: Tensor, text_mask: Tensor) -> Tensor:
        return text
