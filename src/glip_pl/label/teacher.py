"""The teacher: its checkpoint file (or a run's folder, for a second round of self-training), its hash for the
provenance, the model, and its tokenizer read from the checkpoint's config without building the model."""

from __future__ import annotations

import hashlib
import os


def resolve_teacher(path: str) -> str:
    """A checkpoint file, or a run's checkpoint folder (its ``last.ckpt``: the current student as the next
    teacher for a second round of self-training)."""
    if os.path.isdir(path):
        last = os.path.join(path, "last.ckpt")
        if not os.path.exists(last):
            raise FileNotFoundError(f"teacher {path!r} is a folder without last.ckpt")
        return last
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} does not exist")
    return path


def load_teacher(path: str):
    """The GLIP model of a checkpoint, in eval mode; a file of the wrong kind is a clear error."""
    from ..checkpoints import load_glip_checkpoint

    return load_glip_checkpoint(path)


def read_teacher_text(path: str) -> tuple:
    """(tokenizer, max_text_len) of the teacher's text encoder, from the checkpoint's config alone."""
    from ..checkpoints import read_glip_checkpoint
    from ..model.language import build_tokenizer

    cfg, _, _ = read_glip_checkpoint(path)
    return build_tokenizer(cfg.tokenizer), cfg.max_text_len


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
