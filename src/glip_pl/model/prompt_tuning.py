"""Prompt tuning (GLIP §4.3 / reference §5, official ``SOLVER.TUNING_HIGHLEVEL_OVERRIDE language_prompt_v2``).

A zero-initialised row per text position is added to the text encoder's output, and only it trains, so training
starts from exactly the pretrained model. The official ``tunable_linear.weight`` (1000, 768) is added to both
``embedded`` and ``hidden``, which are both BERT's last-layer output (``GLIP.encode_text`` here); only its first
``max_text_len`` rows can be reached. Padding positions get their row too, as officially (the head masks them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .types import GLIPInputError

PROMPT_KEY = "prompt.weight"  # the only trainable tensor of a prompt-tuned GLIP
OFFICIAL_KEY = "tunable_linear.weight"
OFFICIAL_ROWS = 1000


class PromptEmbedding(nn.Module):
    """A (max_text_len, dim) table added position-wise to the text features (B, T, dim), T ≤ max_text_len."""

    def __init__(self, max_text_len: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_text_len, dim))

    def forward(self, text_features: Tensor) -> Tensor:
        T = text_features.shape[1]
        if T > self.weight.shape[0]:
            raise GLIPInputError(f"prompt of {T} tokens but the tunable prompt has {self.weight.shape[0]} positions")
        return text_features + self.weight[:T].to(text_features.dtype).unsqueeze(0)


def freeze_all_but_prompt(model: nn.Module) -> list:
    """Freezes every parameter except ``prompt.*``; returns the names left trainable."""
    trainable = []
    for name, p in model.named_parameters():
        keep = name.startswith("prompt.")
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    return trainable


def official_to_prompt(weight: Tensor, max_text_len: int) -> Tensor:
    """Official ``tunable_linear.weight`` (1000, D) → glip_pl ``prompt.weight`` (max_text_len, D)."""
    if weight.dim() != 2 or weight.shape[0] < max_text_len:
        raise GLIPInputError(f"{OFFICIAL_KEY} of shape {tuple(weight.shape)} has fewer than {max_text_len} rows")
    return weight[:max_text_len].clone()


def prompt_to_official(weight: Tensor, rows: int = OFFICIAL_ROWS) -> Tensor:
    """glip_pl ``prompt.weight`` (L, D) → official ``tunable_linear.weight`` (1000, D), zero-padded."""
    if weight.shape[0] > rows:
        raise GLIPInputError(f"prompt has {weight.shape[0]} rows, more than the official {rows}")
    out = weight.new_zeros(rows, weight.shape[1])
    out[: weight.shape[0]] = weight
    return out
