"""Deep image⇄text fusion of a DyHead block: bidirectional cross-attention (reference §1.5.1, GLIP §3.1 Eq. 3).

All FPN levels form one sequence of N visual tokens; h heads, E = embed_dim, e = E / h. Attribute names follow
the official state dict (reference §8).

The plain path (``use_sdpa=False``) is the official math (the official "+1 on valid positions" mask shifts a
whole row, which softmax ignores, so it is left out). SDPA is the same function wherever |logit| ≤ 50000: the
text side's row-max subtraction is softmax-invariant and the ±50000 clamps only guard fp16 (inf above 65504);
beyond that (a diverged model) the plain path flattens the softmax, SDPA keeps it sharp, both finite. SDPA
never materialises the N×T logits, the saving that matters at N ≈ 22k. Every visual row needs one valid text
token ([CLS] and [SEP] always are), else SDPA gives NaN for it.

``text_output=False`` (the last block when the head scores the encoder's text) drops the text side, whose
parameters would get no gradient and make DDP fail.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CLAMP = 50000.0


class BiMultiHeadAttention(nn.Module):
    """Bidirectional multi-head attention between visual tokens (B,N,C) and text tokens (B,T,D)."""

    def __init__(
        self,
        v_dim: int = 256,
        l_dim: int = 768,
        embed_dim: int = 2048,
        num_heads: int = 8,
        dropout: float = 0.1,
        use_sdpa: bool = True,
        clamp: bool = True,
        text_output: bool = True,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        # A module, not a float, so that switching every nn.Dropout off (p = 0) switches this one off too.
        self.dropout = nn.Dropout(dropout)
        self.use_sdpa = use_sdpa
        self.clamp = clamp
        self.text_output = text_output
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        if text_output:
            self.values_v_proj = nn.Linear(v_dim, embed_dim)
            self.out_l_proj = nn.Linear(embed_dim, l_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Reference §1.5.1.
        for lin in (self.v_proj, self.l_proj, self.values_l_proj, self.out_v_proj,
                    getattr(self, "values_v_proj", None), getattr(self, "out_l_proj", None)):
            if lin is None:
                continue
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _heads(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: Tensor) -> Tensor:
        b, _, s, _ = x.shape
        return x.transpose(1, 2).reshape(b, s, self.embed_dim)

    def forward(self, v: Tensor, l: Tensor, text_mask: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """v (B,N,C), l (B,T,D), text_mask (B,T) bool (True = real token) -> (dv (B,N,C), dl (B,T,D) or None when
        the block has no text output)."""
        q = self._heads(self.v_proj(v))  # (B,h,N,e), unscaled
        k = self._heads(self.l_proj(l))
        val_l = self._heads(self.values_l_proj(l))
        p = self.dropout.p if self.training and self.dropout.training else 0.0
        keep = text_mask.bool()[:, None, None, :]  # (B,1,1,T)
        if not self.text_output:
            if self.use_sdpa:
                out_v = F.scaled_dot_product_attention(q, k, val_l, attn_mask=keep, dropout_p=p, scale=self.scale)
            else:
                out_v = torch.matmul(self._visual_probs(self._logits(q, k), keep, p), val_l)
            return self.out_v_proj(self._merge(out_v)), None
        val_v = self._heads(self.values_v_proj(v))
        if self.use_sdpa:
            out_v = F.scaled_dot_product_attention(q, k, val_l, attn_mask=keep, dropout_p=p, scale=self.scale)
            out_l = F.scaled_dot_product_attention(k, q, val_v, dropout_p=p, scale=self.scale)
        else:
            logits = self._logits(q, k)  # (B,h,N,T)
            logits_t = logits.transpose(-1, -2)
            logits_t = logits_t - logits_t.amax(dim=-1, keepdim=True)
            if self.clamp:
                logits_t = logits_t.clamp(-_CLAMP, _CLAMP)
            # prob_l draws its dropout mask before prob_v: seeded runs depend on that order.
            prob_l = F.dropout(logits_t.softmax(dim=-1), p, self.training)
            out_v = torch.matmul(self._visual_probs(logits, keep, p), val_l)
            out_l = torch.matmul(prob_l, val_v)
        return self.out_v_proj(self._merge(out_v)), self.out_l_proj(self._merge(out_l))

    def _logits(self, q: Tensor, k: Tensor) -> Tensor:
        logits = torch.matmul(q * self.scale, k.transpose(-1, -2))
        return logits.clamp(-_CLAMP, _CLAMP) if self.clamp else logits

    def _visual_probs(self, logits: Tensor, keep: Tensor, p: float) -> Tensor:
        logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
        return F.dropout(logits.softmax(dim=-1), p, self.training)


class BiAttentionBlock(nn.Module):
    """LayerNorm both sides, bi-attention, layer-scaled residual on the normed features (reference §1.5.1)."""

    def __init__(self, v_dim: int = 256, l_dim: int = 768, init_scale: float = 1 / 6, text_output: bool = True,
                 **attn_kwargs: Any):
        """``attn_kwargs``: the rest of :class:`BiMultiHeadAttention`'s arguments."""
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, text_output=text_output, **attn_kwargs)
        self.gamma_v = nn.Parameter(torch.full((v_dim,), float(init_scale)))
        if text_output:
            self.gamma_l = nn.Parameter(torch.full((l_dim,), float(init_scale)))

    def forward(self, v: Tensor, l: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """v (B,N,C), l (B,T,D), text_mask (B,T) -> (v (B,N,C), l (B,T,D))."""
        v = self.layer_norm_v(v)
        l = self.layer_norm_l(l)
        dv, dl = self.attn(v, l, text_mask)
        # The residual goes onto the layer-normed input, as in the official block (reference §9.3).
        return v + self.gamma_v * dv, (l if dl is None else l + self.gamma_l * dl)


class BiAttentionFusion(nn.Module):
    """GLIP deep fusion (VLFuse "MHA-B"): all FPN levels form one visual sequence that attends to the text."""

    def __init__(self, **block_kwargs: Any):
        """Takes :class:`BiAttentionBlock`'s arguments; the block is an attribute for the official key names."""
        super().__init__()
        self.b_attn = BiAttentionBlock(**block_kwargs)

    def forward(self, visual: list[Tensor], text: Tensor, text_mask: Tensor) -> tuple[list[Tensor], Tensor]:
        """visual [(B,C,H_l,W_l)], text (B,T,D), text_mask (B,T) bool -> ([(B,C,H_l,W_l)], (B,T,D))."""
        sizes = [f.shape[-2:] for f in visual]
        v = torch.cat([f.flatten(2) for f in visual], dim=2).transpose(1, 2)  # (B,N,C)
        v, text = self.b_attn(v, text, text_mask)
        v = v.transpose(1, 2)  # (B,C,N)
        chunks = v.split([h * w for h, w in sizes], dim=2)
        return [c.reshape(c.shape[0], c.shape[1], h, w) for c, (h, w) in zip(chunks, sizes)], text


class NoFusion(nn.Module):
    """No image⇄text fusion (GLIP-T(A), ``EARLY_FUSE_ON: False``): returns its inputs unchanged."""

    def forward(self, visual: list[Tensor], text: Tensor, text_mask: Tensor) -> tuple[list[Tensor], Tensor]:
        return visual, text
