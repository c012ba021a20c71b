"""glip_pl.eval: evaluation (COCO / LVIS / Flickr30k) and inference (``Predictor``) for GLIP models.

* ``coco``: ``evaluate_coco`` (12 standard metrics, faster-coco-eval or pycocotools), ``CocoEvaluator`` (a
  batch-wise accumulator for validation loops), ``detections_to_coco``; ``per_image``: one result per image across
  ranks (shared by the accumulators).
* ``zero_shot``: ``evaluate_model_coco`` (class names as the prompt); ``category_prompts``: those prompts (names,
  templates, chunks).
* ``lvis``: ``evaluate_lvis`` (AP, APr/APc/APf; standard and Fixed AP), ``LvisEvaluator``, ``evaluate_model_lvis``.
* ``flickr``: ``evaluate_flickr`` (Recall@1/5/10, upper bound, per phrase type), ``FlickrEvaluator``.
* ``chunked``: prompts past the text limit — backbone once per image, head once per chunk.
* ``predictor``: ``Predictor`` / ``Prediction``; ``draw``: boxes and phrases on a PIL image.
* ``detections``: ``load_json`` (``CocoEvalError``), ``validate_detections`` → ``DetectionsFileError`` naming the
  first bad record.
* ``cli`` / ``cli_predict`` / ``cli_odinw``: ``glip-pl evaluate`` / ``predict`` / ``odinw``.

Attributes load lazily (the CLI and a data worker import only what they use). Nothing here imports Lightning;
gathering across ranks is ``glip_pl.distributed``'s.
"""

from importlib import import_module

_EXPORTS = {
    "evaluate_coco": "coco",
    "CocoEvaluator": "coco",
    "CocoEvalError": "detections",
    "detections_to_coco": "coco",
    "evaluate_model_coco": "zero_shot",
    "format_table": "coco",
    "format_per_category": "coco",
    "evaluate_lvis": "lvis",
    "LvisEvaluator": "lvis",
    "evaluate_model_lvis": "lvis",
    "lvis_chunks": "lvis",
    "evaluate_flickr": "flickr",
    "FlickrEvaluator": "flickr",
    "FlickrGroundTruth": "flickr",
    "evaluate_model_flickr": "flickr",
    "PromptChunk": "chunked",
    "chunk_prompt": "chunked",
    "chunk_class_names": "chunked",
    "detect_chunks": "chunked",
    "merge_chunk_detections": "chunked",
    "Predictor": "predictor",
    "Prediction": "predictor",
    "draw_prediction": "draw",
    "draw_boxes": "draw",
    "validate_detections": "detections",
    "DetectionsFileError": "detections",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"glip_pl.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'glip_pl.eval' has no attribute {name!r}")
