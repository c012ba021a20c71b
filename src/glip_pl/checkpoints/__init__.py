"""Reading and writing every kind of checkpoint glip_pl meets, in one place (DESIGN.md practice 14).

* ``glip``: glip_pl model files and Lightning checkpoints of ``GLIPLitModule`` — ``read_glip_checkpoint``,
  ``load_glip_checkpoint`` (a model), ``load_model_weights`` (into a model), ``load_model`` (through loaders),
  ``check_state_dict`` (the one missing / unexpected / shape check), ``checkpoint_problem`` (why a Lightning
  checkpoint cannot be resumed from), ``write_glip_checkpoint``.
* ``official`` / ``official_names``: released official GLIP files ⇄ glip_pl (``import_official``,
  ``export_official``).
* ``zero`` / ``dcp`` / ``consolidate``: sharded DeepSpeed ZeRO and FSDP2 directories → one glip_pl file.
* ``cli_official`` / ``cli_consolidate``: ``glip-pl import-official`` / ``export-official`` / ``consolidate``.

Every file is read with ``torch.load(weights_only=True)`` (DCP metadata through an allow-list); a file that needs
more is refused, naming it. Nothing here imports Lightning.
"""

from importlib import import_module

from .glip import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    check_state_dict,
    checkpoint_problem,
    glip_shapes,
    load_glip_checkpoint,
    load_model,
    load_model_weights,
    read_glip_checkpoint,
    safe_torch_load,
    write_glip_checkpoint,
)

_LAZY = {
    "import_official": "official",
    "export_official": "official",
    "load_official_state_dict": "official",
    "official_to_glip": "official",
    "glip_to_official": "official",
    "ImportReport": "official",
    "consolidate_zero_checkpoint": "consolidate",
    "consolidate_dcp_checkpoint": "consolidate",
}

__all__ = ["FORMAT", "FORMAT_VERSION", "CheckpointError", "check_state_dict", "checkpoint_problem", "glip_shapes", "load_glip_checkpoint",
           "load_model", "load_model_weights", "read_glip_checkpoint", "safe_torch_load", "write_glip_checkpoint",
           *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f"glip_pl.checkpoints.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'glip_pl.checkpoints' has no attribute {name!r}")
