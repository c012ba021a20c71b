"""glip_pl.model: the GLIP detector in plain PyTorch (no Lightning, torch.distributed, W&B or DeepSpeed).

Entry points: ``build_glip(preset, **overrides)``, ``GLIP``, ``get_config``, ``PRESETS`` and the typed contracts in
``glip_pl.model.types``. Attributes are imported lazily so that a light import (e.g. the prompt tools in a data
worker) does not build the whole stack.
"""

from importlib import import_module

_EXPORTS = {
    "GLIP": "glip_pl.model.glip",
    "build_glip": "glip_pl.model.glip",
    "make_targets": "glip_pl.model.glip",
    "GLIPConfig": "glip_pl.model.presets",
    "get_config": "glip_pl.model.presets",
    "PRESETS": "glip_pl.model.presets",
    "OFFICIAL_PARAMS": "glip_pl.model.presets",
    "TextInputs": "glip_pl.model.types",
    "Targets": "glip_pl.model.types",
    "GroundingOutputs": "glip_pl.model.types",
    "Detections": "glip_pl.model.types",
    "GLIPInputError": "glip_pl.model.types",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'glip_pl.model' has no attribute {name!r}")
