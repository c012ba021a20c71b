"""Text encoder: BERT (bert-base-uncased architecture) from transformers, and its fast tokenizer.

Reference §1.4. Weights never come from the network here (a local directory or the local HF cache, else random
init); the bert-base-uncased WordPiece vocabulary (Apache-2.0) ships in ``glip_pl/assets`` so tokenisation is
always exact and offline.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import resources
from typing import Optional, Sequence

from torch import Tensor, nn

from .types import GLIPInputError, TextInputs

log = logging.getLogger(__name__)

BERT_BASE = "bert-base-uncased"


def bundled_vocab_path() -> str:
    return str(resources.files("glip_pl") / "assets" / "bert-base-uncased-vocab.txt")


def _local_hf_dir(name_or_path: str) -> Optional[str]:
    if os.path.isdir(name_or_path):
        return name_or_path
    try:
        from huggingface_hub import snapshot_download

        from ..hub import hf_cache_dir

        return snapshot_download(name_or_path, local_files_only=True, cache_dir=hf_cache_dir())
    except Exception:  # not cached (or hub library refuses offline): caller falls back
        return None


def build_tokenizer(name_or_path: Optional[str] = None):
    """Fast BERT tokenizer (character offsets) from a folder, a vocab.txt, a cached name or None (bundled)."""
    from transformers import BertTokenizerFast

    if name_or_path and os.path.isfile(name_or_path):
        return _tokenizer_from_vocab(name_or_path)
    if name_or_path and name_or_path != BERT_BASE:
        local = _local_hf_dir(name_or_path)
        if local is None:
            raise GLIPInputError(
                f"tokenizer {name_or_path!r}: not a local directory or file and not in the local HF cache "
                "(glip_pl never downloads at run time)"
            )
        return BertTokenizerFast.from_pretrained(local, local_files_only=True)
    # bert-base-uncased: the bundled vocabulary is byte-identical to the hub's vocab.txt.
    return _tokenizer_from_vocab(bundled_vocab_path())


def _tokenizer_from_vocab(path: str):
    from transformers import BertTokenizerFast

    with open(path, encoding="utf-8") as f:
        tokens = f.read().split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    if "[UNK]" not in tokens or "[CLS]" not in tokens:
        raise GLIPInputError(f"{path}: not a BERT vocabulary (no [UNK]/[CLS] entries)")
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)


@dataclass
class TextEncoderConfig:
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    pretrained: Optional[str] = None  # local dir / HF-cache name with weights; None = random init


class TextEncoder(nn.Module):
    """BERT encoder returning the last layer's features (B, T, D) and the attention mask."""

    def __init__(self, cfg: TextEncoderConfig, gradient_checkpointing: bool = False):
        super().__init__()
        from transformers import BertConfig, BertModel

        from ..hub import download_command

        self.cfg = cfg
        local = _local_hf_dir(cfg.pretrained) if cfg.pretrained else None
        if cfg.pretrained and local is None and cfg.pretrained.startswith(("/", ".", "~")):
            raise GLIPInputError(f"text__pretrained {cfg.pretrained!r}: no such directory; give a folder with the "
                                 f"model files or a Hub name such as {BERT_BASE} (in the Hugging Face cache)")
        if cfg.pretrained and local is None:
            raise GLIPInputError(
                f"text encoder weights {cfg.pretrained!r}: not a local directory and not in the local HF cache; "
                f"run once with network: `{download_command(cfg.pretrained, 'config.json', 'model.safetensors')}` "
                "(fills the cache), or pass a path"
            )
        if local is not None:
            self.model = BertModel.from_pretrained(local, add_pooling_layer=False, local_files_only=True)
            log.info("text encoder: loaded pretrained weights from %s", local)
        else:
            config = BertConfig(
                vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                intermediate_size=cfg.intermediate_size,
                max_position_embeddings=cfg.max_position_embeddings,
            )
            self.model = BertModel(config, add_pooling_layer=False)
        if gradient_checkpointing:
            self.model.config.use_cache = False
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def forward(self, text: TextInputs) -> Tensor:
        """(B, T) token ids → (B, T, D) features of the last layer (not masked, as the official ``hidden``)."""
        out = self.model(
            input_ids=text.input_ids,
            attention_mask=text.attention_mask,
            token_type_ids=text.token_type_ids,
        )
        return out.last_hidden_state


def tokenize(tokenizer, captions: Sequence[str], max_length: int = 256, pad_to: Optional[int] = None):
    """Tokenise a batch, padded to its longest caption (or to ``pad_to``); returns (TextInputs, offsets)."""
    if len(captions) == 0:
        raise GLIPInputError("empty batch of prompts")
    for i, c in enumerate(captions):
        if not isinstance(c, str) or not c.strip():
            raise GLIPInputError(f"prompt #{i} is empty or not text: {c!r}")
    if pad_to is not None and pad_to > max_length:
        raise GLIPInputError(f"pad_to ({pad_to}) exceeds the text limit max_length ({max_length})")
    enc = tokenizer(
        list(captions),
        max_length=max_length if pad_to is None else pad_to,
        truncation=True,
        padding="longest" if pad_to is None else "max_length",
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    offsets = [[tuple(map(int, o)) for o in row] for row in enc["offset_mapping"].tolist()]
    text = TextInputs(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        token_type_ids=enc.get("token_type_ids"),
    )
    return text, offsets


def text_mask(text: TextInputs) -> Tensor:
    return text.attention_mask.bool()


__all__ = ["TextEncoder", "TextEncoderConfig", "build_tokenizer", "tokenize", "bundled_vocab_path"]
