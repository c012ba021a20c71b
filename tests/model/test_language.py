"""Pretrained parts load only from local files; nothing is downloaded (reference §1.2, §1.4)."""

import pytest
import torch

from glip_pl.model import build_glip
from glip_pl.model.language import TextEncoder, TextEncoderConfig, build_tokenizer
from glip_pl.model.types import GLIPInputError

SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def test_text_encoder_loads_local_weights(tmp_path):
    torch.manual_seed(0)
    src = TextEncoder(TextEncoderConfig(**SMALL))
    src.model.save_pretrained(tmp_path / "bert")
    loaded = TextEncoder(TextEncoderConfig(**SMALL, pretrained=str(tmp_path / "bert")))
    for (n, a), (_, b) in zip(src.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_unknown_pretrained_name_is_an_error_not_a_download():
    with pytest.raises(GLIPInputError, match="not in the local HF cache"):
        TextEncoder(TextEncoderConfig(**SMALL, pretrained="someone/not-cached-model"))
    with pytest.raises(GLIPInputError, match="never downloads"):
        build_tokenizer("someone/not-cached-tokenizer")


def test_tokenizer_from_a_vocab_file(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "circle", "."]) + "\n")
    tok = build_tokenizer(str(vocab))
    assert tok.convert_ids_to_tokens(tok("Red circle. blue")["input_ids"]) == ["[CLS]", "red", "circle", ".", "[UNK]", "[SEP]"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(GLIPInputError, match="not a BERT vocabulary"):
        build_tokenizer(str(bad))


def test_swin_loads_local_imagenet_weights(tmp_path):
    torch.manual_seed(0)
    ref = build_glip("tiny")
    # a timm-format Swin state dict (what timm's checkpoint filter expects: the classifier model's keys)
    import timm

    cfg = ref.cfg.swin
    full = timm.create_model(cfg.timm_name, pretrained=False, embed_dim=cfg.embed_dim, depths=cfg.depths,
                             num_heads=cfg.num_heads, window_size=cfg.window_size)
    path = tmp_path / "swin.pth"
    torch.save(full.state_dict(), path)
    model = build_glip("tiny", swin__pretrained=str(path))
    got = model.backbone.body.swin.state_dict()
    want = full.state_dict()
    # features_only names stages layers_{i}; the classifier names them layers.{i}
    assert torch.equal(got["layers_1.blocks.0.attn.qkv.weight"], want["layers.1.blocks.0.attn.qkv.weight"])
    assert not torch.equal(got["layers_1.blocks.0.attn.qkv.weight"],
                           ref.backbone.body.swin.state_dict()["layers_1.blocks.0.attn.qkv.weight"])
    assert torch.equal(got["patch_embed.proj.weight"], want["patch_embed.proj.weight"])
