"""Box AP of a validation epoch: per-image ground truth and detections → COCO dicts → ``evaluate_coco``.

Not ``CocoEvaluator``: it needs the ground truth up front as a COCO file with integer image ids, while validation
reads it from the shards, batch by batch, keyed by sample id."""

from __future__ import annotations


def box_ap(gt: list, dt: list, verbose: bool = False, per_category: bool = False, names: dict | None = None) -> dict:
    """gt: [(image_key, (h, w), boxes xyxy, category ids)], dt: [(image_key, boxes xyxy, scores, category ids)].

    Every image counts once (its key's first occurrence), so sampler padding or a repeated shard cannot inflate the
    metric. ``per_category`` adds {category id: {name, AP, AP50, AP75, instances}}.
    """
    from glip_pl.eval.coco import evaluate_coco

    ids: dict = {}
    images, anns, cats = [], [], set()
    for key, (h, w), boxes, labels in gt:
        if key in ids:
            continue
        ids[key] = len(ids) + 1
        images.append({"id": ids[key], "width": int(w), "height": int(h), "file_name": str(key)})
        for (x1, y1, x2, y2), c in zip(boxes, labels):
            anns.append({"id": len(anns) + 1, "image_id": ids[key], "category_id": int(c), "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
            cats.add(int(c))
    seen, dets = set(), []
    for key, boxes, scores, labels in dt:
        if key in seen or key not in ids:
            continue
        seen.add(key)
        for (x1, y1, x2, y2), s, c in zip(boxes, scores, labels):
            cats.add(int(c))
            dets.append({"image_id": ids[key], "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": float(s)})
    names = names or {}
    gt_dict = {"images": images, "annotations": anns,
               "categories": [{"id": c, "name": str(names.get(c, c))} for c in sorted(cats)]}
    if not dets:
        from glip_pl.eval.coco import METRIC_NAMES

        out = {k: 0.0 for k in METRIC_NAMES}
        if per_category:  # a category with ground truth and no detection scores 0, as evaluate_coco scores it
            out["per_category"] = {}
            for c in sorted(cats):
                n = sum(a["category_id"] == c for a in anns)
                ap = 0.0 if n else None
                out["per_category"][c] = {"name": str(names.get(c, c)), "AP": ap, "AP50": ap, "AP75": ap,
                                          "instances": n}
        return out
    return evaluate_coco(gt_dict, dets, verbose=verbose, validate=True, per_category=per_category)
