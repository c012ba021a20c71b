"""glip_pl.data: shards (converters + writer), the sample schema, the reader and the streaming pipeline.

See README.md in this package for the stage diagram. ``glip_pl.model`` never imports from here.
"""

from .batch import GroundingBatch, collate
from .loader import GroundingLoader, build_loader
from .pipeline import STAGES, GroundingStream, SourceSpec, build_pipeline
from .prompting import PromptConfig
from .reader import iter_samples
from .schema import ConversionError, Sample, ShardError
from .transforms import TransformConfig

__all__ = [
    "ConversionError", "GroundingBatch", "GroundingLoader", "GroundingStream", "PromptConfig", "STAGES", "Sample",
    "ShardError", "SourceSpec", "TransformConfig", "build_loader", "build_pipeline", "collate", "iter_samples",
]
