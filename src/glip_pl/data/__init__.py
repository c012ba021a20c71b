"""glip_pl.data: shards (converters + writer), the sample schema, the reader and the streaming pipeline.

See README.md in this package for the stage diagram. ``glip_pl.model`` never imports from here.

Attributes are imported lazily: the predictor and the evaluators use ``image_io`` / ``schema`` alone, without
building the streaming pipeline (the core install, without the training extra, has no WebDataset).
"""

from importlib import import_module

_EXPORTS = {
    "GroundingBatch": "batch",
    "collate": "batch",
    "GroundingLoader": "loader",
    "build_loader": "loader",
    "STAGES": "pipeline",
    "GroundingStream": "pipeline",
    "SourceSpec": "pipeline",
    "build_pipeline": "pipeline",
    "PromptConfig": "prompting",
    "iter_samples": "reader",
    "ConversionError": "schema",
    "Sample": "schema",
    "ShardError": "schema",
    "TransformConfig": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"glip_pl.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'glip_pl.data' has no attribute {name!r}")
