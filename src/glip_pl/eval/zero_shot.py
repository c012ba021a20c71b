"""Zero-shot COCO-style evaluation of a model (GLIP §4.1, reference §6): the class names are the prompt, each phrase
is mapped back to its category id, and the detections are scored with ``evaluate_coco``."""

from __future__ import annotations

from typing import Callable, Optional

from .category_prompts import category_prompt_names, templated_chunks
from .coco import CocoEvaluator, make_coco_gt


def evaluate_model_coco(predictor, gt, image_root: Optional[str] = None, image_loader: Optional[Callable] = None,
                        batch_size: int = 1, max_images: Optional[int] = None, override: Optional[dict] = None,
                        templates: Optional[dict] = None, backend: str = "faster", verbose: bool = True,
                        **post) -> dict:
    """Zero-shot COCO-style evaluation of a model: the class names are the prompt (chunked if too long).

    ``predictor``: a ``glip_pl.eval.Predictor``; images come from ``image_loader(image_record)`` or
    ``image_root/file_name``. Returns the metrics and keeps the detections under ``"detections"``.
    """
    from .predictor import load_image_record

    coco_gt = make_coco_gt(gt, backend)
    cat_ids, names = category_prompt_names(coco_gt, override)
    tmpl = None
    if templates:
        tmpl = [templates.get(c, templates.get(str(c), templates.get(n))) for c, n in zip(cat_ids, names)]
    chunks = templated_chunks(names, tmpl, predictor.model.tokenizer, max_len=predictor.max_text_len)
    images = sorted(coco_gt.dataset["images"], key=lambda r: r["id"])
    if max_images:
        images = images[:max_images]
    ev = CocoEvaluator(coco_gt.dataset, backend=backend, plus_one=bool(getattr(predictor.model.cfg, "official_compat", False)),
                       gather_fn=lambda o: [o], verbose=verbose)
    for s in range(0, len(images), batch_size):
        recs = images[s : s + batch_size]
        pics = [image_loader(r) if image_loader else load_image_record(r, image_root) for r in recs]
        dets = predictor.detect(pics, chunks, **post)
        ev.update([r["id"] for r in recs], dets, cat_ids)
    metrics = ev.compute()
    metrics["detections"] = ev.detections()
    return metrics


__all__ = ["evaluate_model_coco"]
