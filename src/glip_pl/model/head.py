"""VL-DyHead: K × [fusion → text layer → DyHead block], then region–token alignment, boxes, centerness.

Reference §1.5 (tower order and per-block contents) and §1.5.4 (output heads). The tower is one flat
``dyhead_tower`` list in the official order — index 3k is the fusion, 3k+1 the extra BERT layer, 3k+2 the
DyHead block — so official checkpoint names map by prefix. GLIP-T(A) uses the same tower with ``NoFusion`` and
``IdentityTextLayer`` (parameter-free), i.e. variants are classes, not switches inside ``forward``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .dyhead import DyHeadBlock
from .fusion import BiAttentionFusion, NoFusion
from .text_layer import IdentityTextLayer, TextLayer

CLAMP = 50_000.0  # official CLAMP_DOT_PRODUCT


class Scale(nn.Module):
    """A learnable scalar per FPN level for the box regression (official ``scales.{l}.scale``)."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _maybe_checkpoint(enabled: bool, fn, *args):
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class GLIPHead(nn.Module):
    def __init__(
        self,
        channels: int = 256,
        text_dim: int = 768,
        num_blocks: int = 6,
        num_levels: int = 5,
        fusion: str = "bi_attention",
        fusion_embed_dim: int = 2048,
        fusion_heads: int = 8,
        fusion_dropout: float = 0.1,
        text_layer_heads: int = 12,
        text_layer_intermediate: int = 3072,
        use_fused_text: bool = True,
        groupnorm_groups: int = 16,
        official_compat: bool = False,
        use_sdpa: bool = True,
        deform_conv: str = "auto",
        checkpoint_fusion: bool = False,
        checkpoint_text: bool = False,
        checkpoint_dyhead: bool = False,
        prior_prob: float = 0.01,
    ):
        super().__init__()
        if fusion not in ("bi_attention", "none"):
            raise ValueError(f"unknown fusion {fusion!r}; use 'bi_attention' or 'none'")
        tower = []
        for k in range(num_blocks):
            if fusion == "bi_attention":
                # The extra BERT layer exists in every block but the last unless the fused text feeds the
                # dot product (official USE_FUSED_FEATURES_DOT_PRODUCT); without it, the last fusion's text
                # output would feed nothing, so that block is built one-way (text -> visual).
                last = k == num_blocks - 1
                tower.append(BiAttentionFusion(
                    v_dim=channels, l_dim=text_dim, embed_dim=fusion_embed_dim, num_heads=fusion_heads,
                    dropout=fusion_dropout, init_scale=1.0 / num_blocks, use_sdpa=use_sdpa,
                    text_output=use_fused_text or not last,
                ))
                if use_fused_text or not last:
                    tower.append(TextLayer(hidden=text_dim, heads=text_layer_heads,
                                           intermediate=text_layer_intermediate, use_sdpa=use_sdpa))
                else:
                    tower.append(IdentityTextLayer())
            else:
                tower.extend([NoFusion(), IdentityTextLayer()])
            tower.append(DyHeadBlock(channels, groupnorm_groups=groupnorm_groups, official_compat=official_compat,
                                     deform_conv=deform_conv))
        self.dyhead_tower = nn.ModuleList(tower)
        self.num_blocks = num_blocks
        self.use_fused_text = use_fused_text
        self.checkpoint_fusion, self.checkpoint_text, self.checkpoint_dyhead = checkpoint_fusion, checkpoint_text, checkpoint_dyhead

        self.bbox_pred = nn.Conv2d(channels, 4, 1)
        self.centerness = nn.Conv2d(channels, 1, 1)
        for conv in (self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        self.dot_product_projection_text = nn.Linear(text_dim, channels)
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.bias_lang = nn.Parameter(torch.zeros(text_dim))
        self.bias0 = nn.Parameter(torch.tensor([-math.log((1 - prior_prob) / prior_prob)]))

    def run_tower(self, visual: list, text: Tensor, text_mask: Tensor):
        """(list of (B,C,H_l,W_l), (B,T,D), (B,T) bool) → the same after K fused blocks."""
        for k in range(self.num_blocks):
            fuse, text_layer, dyhead = self.dyhead_tower[3 * k: 3 * k + 3]
            if not isinstance(fuse, NoFusion):
                n = len(visual)
                out = _maybe_checkpoint(self.checkpoint_fusion, _fuse_flat, fuse, n, *visual, text, text_mask)
                visual, text = list(out[:n]), out[n]
            if not isinstance(text_layer, IdentityTextLayer):
                text = _maybe_checkpoint(self.checkpoint_text, text_layer, text, text_mask)
            visual = list(_maybe_checkpoint(self.checkpoint_dyhead, _dyhead_flat, dyhead, *visual))
        return visual, text

    def forward(self, visual: list, text: Tensor, text_mask: Tensor):
        """Returns logits (B,N,T), box regression (B,N,4), centerness logits (B,N), level sizes [(H,W)]."""
        text_in = text
        visual, text = self.run_tower(visual, text, text_mask)
        if not self.use_fused_text:  # GLIP-T(A): the encoder's output with padding zeroed ("embedded")
            text = text_in * text_mask.unsqueeze(-1).to(text_in.dtype)
        sizes = [tuple(v.shape[-2:]) for v in visual]
        box = torch.cat([self.scales[i](self.bbox_pred(v)).flatten(2) for i, v in enumerate(visual)], 2).transpose(1, 2)
        ctr = torch.cat([self.centerness(v).flatten(2) for v in visual], 2)[:, 0]
        query = torch.cat([v.flatten(2) for v in visual], 2).transpose(1, 2)  # (B, N, C), no projection/normalisation
        logits = self.alignment_logits(query, text)
        return logits, box, ctr, sizes

    def alignment_logits(self, query_BNC: Tensor, text_BTD: Tensor) -> Tensor:
        """GLIP Eq. 3: region–token scores; text L2-normalised, /2, projected; bias from text + scalar."""
        # Normalised in fp32: F.normalize's eps (1e-12) is 0 in fp16, so the zeroed padding tokens of a half model
        # would give 0/0 = NaN. The result goes back to the text's dtype to meet the projection's weights.
        emb = F.normalize(text_BTD.float(), p=2, dim=-1).to(text_BTD.dtype)
        proj = self.dot_product_projection_text(emb / 2.0)  # (B, T, C)
        bias = emb @ self.bias_lang + self.bias0  # (B, T)
        logits = (query_BNC @ proj.transpose(1, 2)) / self.log_scale.exp() + bias.unsqueeze(1)
        return logits.clamp(-CLAMP, CLAMP)


def _fuse_flat(module, n: int, *xs):
    """Flat tensors in and out, as activation checkpointing wants."""
    visual, text = module(list(xs[:n]), xs[n], xs[n + 1])
    return (*visual, text)


def _dyhead_flat(module, *visual):
    return tuple(module(list(visual)))
