"""Initialising a model from any checkpoint glip_pl can read, safely.

Every load goes through ``glip_pl.official.read_glip_checkpoint`` (``torch.load(weights_only=True)``; a file that
needs more than tensors and plain containers is refused, never unpickled). Readable: glip_pl model files
(``import-official`` output, consolidated DeepSpeed exports) and Lightning checkpoints of ``GLIPLitModule``.
"""

from __future__ import annotations

from glip_pl.official import OfficialCheckpointError, load_glip_checkpoint, read_glip_checkpoint

__all__ = ["CheckpointError", "load_glip_checkpoint", "load_model_weights", "read_glip_checkpoint"]

CheckpointError = OfficialCheckpointError


def load_model_weights(model, path, preset: str | None = None) -> None:
    """Load a checkpoint's weights into ``model`` strictly; another preset or a shape mismatch is a clear error
    raised before any training starts."""
    _, ck_preset, sd = read_glip_checkpoint(path, preset)
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and own[k].shape != v.shape]
    optional = set(getattr(model, "optional_state_keys", ()))  # e.g. a new zero-init prompt
    missing = [k for k in own if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in own]
    if mismatched or missing or unexpected:
        raise CheckpointError(
            f"{path}: weights of preset {ck_preset!r} do not fit this model: {len(mismatched)} shape mismatches "
            f"{mismatched[:3]}, {len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )
    model.load_state_dict(sd, strict=not any(k not in sd for k in optional))
