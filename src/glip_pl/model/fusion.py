"""Deep image⇄text fusion of a DyHead block: bidirectional cross-attention (reference §1.5.1, GLIP §3.1 Eq. 3).

Shape legend: B batch, C visual channels (v_dim, 256), H_l×W_l size of FPN level l, N = Σ_l H_l·W_l visual
tokens over all levels (one joint sequence), T text tokens, D text width (l_dim, 768), h heads, E = embed_dim
(2048), e = E / h head width.

Attribute names follow the official state dict below ``rpn.head.dyhead_tower.{3i}.`` (reference §8):
``b_attn.{gamma_v, gamma_l, layer_norm_v, layer_norm_l, attn.{v_proj, l_proj, values_v_proj, values_l_proj,
out_v_proj, out_l_proj}}``.

Two equivalent attention paths (``use_sdpa``):

* plain: the official math with explicit matmuls — logits A = (q·e^-½) kᵀ of shape (B·h, N, T), clamped to
  ±50000; visual side softmax over text with padding masked; text side softmax of (Aᵀ − rowmax) clamped again,
  over visual tokens, unmasked. The official "+1 on valid positions" mask quirk shifts every unmasked logit of
  a row by the same constant, which softmax ignores, so it is left out.
* fused: ``scaled_dot_product_attention`` once per direction (visual→text with a boolean padding mask,
  text→visual unmasked). Why it is the same function: the clamps only change logits with |A| > 50000, and
  the row-max subtraction on the text side is softmax-invariant (softmax subtracts the max itself, so in
  fp32/bf16, whose range is ~3e38, nothing overflows without it); masking with −inf (SDPA) or with the dtype's
  most negative number (plain) both give exactly zero probability to padding. The clamps exist for fp16 AMP,
  where a logit above 65504 becomes inf; for every |A| ≤ 50000 both paths agree to rounding (tested to 1e-5
  in fp32). A logit above 50000 would need |q|·|k| ≳ 8e5 per head, i.e. an already diverged model; there the
  plain path flattens the softmax while SDPA keeps it sharp — both finite. For fp16 training prefer the plain
  path (or bf16). Cost: SDPA computes the N×T logits twice (once per direction) but never materialises them,
  which is the memory saving that matters at N ≈ 22k.

``text_output=False`` builds a one-way block (text → visual only) for the last block of a head whose dot product
scores the encoder's text rather than the fused text (``use_fused_text=False`` with fusion on): the text side
(``values_v_proj``, ``out_l_proj``, ``gamma_l``) would feed nothing there, and parameters without a gradient make
DDP fail. No released checkpoint uses that combination, so no official key is lost.

Every visual row must have at least one valid text token (true for GLIP prompts: [CLS] and [SEP] are valid);
otherwise SDPA returns NaN for that row while the plain path averages the padding.
"""

from __future__ import annotations

from typing import Optional

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
        # a module rather than a float so that switching every nn.Dropout off (p = 0) switches this one off too;
        # its p is read at each call and handed to SDPA / F.dropout (a p of 0 draws no random numbers)
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
        # Reference §1.5.1: all six linears xavier_uniform, bias 0.
        for lin in (self.v_proj, self.l_proj, self.values_l_proj, self.out_v_proj,
                    getattr(self, "values_v_proj", None), getattr(self, "out_l_proj", None)):
            if lin is None:
                continue
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _heads(self, x: Tensor) -> Tensor:
        """(B, S, E) -> (B, h, S, e)."""
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: Tensor) -> Tensor:
        """(B, h, S, e) -> (B, S, E)."""
        b, _, s, _ = x.shape
        return x.transpose(1, 2).reshape(b, s, self.embed_dim)

    def forward(self, v: Tensor, l: Tensor, text_mask: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """v (B,N,C), l (B,T,D), text_mask (B,T) bool (True = real token) -> (dv (B,N,C), dl (B,T,D) or None when
        the block has no text output)."""
        q = self._heads(self.v_proj(v))  # (B,h,N,e), unscaled
        k = self._heads(self.l_proj(l))  # (B,h,T,e)
        val_l = self._heads(self.values_l_proj(l))  # (B,h,T,e)
        p = self.dropout.p if self.training and self.dropout.training else 0.0
        keep = text_mask.bool()[:, None, None, :]  # (B,1,1,T)
        if not self.text_output:  # visual side only: identical to the visual half of both paths below
            if self.use_sdpa:
                out_v = F.scaled_dot_product_attention(q, k, val_l, attn_mask=keep, dropout_p=p, scale=self.scale)
            else:
                logits = torch.matmul(q * self.scale, k.transpose(-1, -2))
                if self.clamp:
                    logits = logits.clamp(-_CLAMP, _CLAMP)
                logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
                out_v = torch.matmul(F.dropout(logits.softmax(dim=-1), p, self.training), val_l)
            return self.out_v_proj(self._merge(out_v)), None
        val_v = self._heads(self.values_v_proj(v))  # (B,h,N,e)
        if self.use_sdpa:
            out_v = F.scaled_dot_product_attention(q, k, val_l, attn_mask=keep, dropout_p=p, scale=self.scale)
            out_l = F.scaled_dot_product_attention(k, q, val_v, dropout_p=p, scale=self.scale)
        else:
            logits = torch.matmul(q * self.scale, k.transpose(-1, -2))  # (B,h,N,T)
            if self.clamp:
                logits = logits.clamp(-_CLAMP, _CLAMP)
            logits_t = logits.transpose(-1, -2)  # (B,h,T,N)
            logits_t = logits_t - logits_t.amax(dim=-1, keepdim=True)
            if self.clamp:
                logits_t = logits_t.clamp(-_CLAMP, _CLAMP)
            prob_l = F.dropout(logits_t.softmax(dim=-1), p, self.training)
            logits_v = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
            prob_v = F.dropout(logits_v.softmax(dim=-1), p, self.training)
            out_v = torch.matmul(prob_v, val_l)  # (B,h,N,e)
            out_l = torch.matmul(prob_l, val_v)  # (B,h,T,e)
        return self.out_v_proj(self._merge(out_v)), self.out_l_proj(self._merge(out_l))


class BiAttentionBlock(nn.Module):
    """LayerNorm both sides, bi-attention, layer-scaled residual on the normed features (reference §1.5.1)."""

    def __init__(
        self,
        v_dim: int = 256,
        l_dim: int = 768,
        embed_dim: int = 2048,
        num_heads: int = 8,
        dropout: float = 0.1,
        init_scale: float = 1 / 6,
        use_sdpa: bool = True,
        clamp: bool = True,
        text_output: bool = True,
    ):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads, dropout, use_sdpa, clamp, text_output)
        self.gamma_v = nn.Parameter(torch.full((v_dim,), float(init_scale)))
        if text_output:
            self.gamma_l = nn.Parameter(torch.full((l_dim,), float(init_scale)))

    def forward(self, v: Tensor, l: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """v (B,N,C), l (B,T,D), text_mask (B,T) -> (v (B,N,C), l (B,T,D))."""
        v = self.layer_norm_v(v)
        l = self.layer_norm_l(l)
        dv, dl = self.attn(v, l, text_mask)
        # The residual is added to the layer-normed input, as the official block does (reference §9.3).
        return v + self.gamma_v * dv, (l if dl is None else l + self.gamma_l * dl)


class BiAttentionFusion(nn.Module):
    """GLIP deep fusion (VLFuse "MHA-B"): all FPN levels form one visual sequence that attends to the text."""

    def __init__(
        self,
        v_dim: int = 256,
        l_dim: int = 768,
        embed_dim: int = 2048,
        num_heads: int = 8,
        dropout: float = 0.1,
        init_scale: float = 1 / 6,
        use_sdpa: bool = True,
        clamp: bool = True,
        text_output: bool = True,
    ):
        super().__init__()
        self.b_attn = BiAttentionBlock(v_dim, l_dim, embed_dim, num_heads, dropout, init_scale, use_sdpa, clamp,
                                       text_output)

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
        """visual [(B,C,H_l,W_l)], text (B,T,D), text_mask (B,T) -> the same objects."""
        return visual, text
