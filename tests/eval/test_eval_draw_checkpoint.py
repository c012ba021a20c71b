"""Prediction pictures of a demo-like checkpoint (the suite's shared CLI-trained tiny model, ``pretrained_tiny``): on
synthetic val scenes, the label painted last over each true object is that object's top-scoring phrase, it is visible
in the picture, and every label lies inside the image. The predictor takes its image size from the checkpoint."""

import json
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from glip_pl.data import iter_samples
from glip_pl.eval.draw import color_for, render_prediction
from glip_pl.eval.predictor import Predictor

IMAGES = 8
MATCH_IOU = 0.5


def test_label_on_top_of_each_object_is_its_top_scoring_phrase(pretrained_tiny, synthetic_shards):
    from helpers.pretrained import PRETRAIN_SIZE

    predictor = Predictor.from_checkpoint(str(pretrained_tiny[1]))
    assert predictor.min_size == PRETRAIN_SIZE  # the checkpoint's val_size, not 800
    index = json.loads((Path(synthetic_shards) / "detection" / "index.json").read_text())
    names = [c["name"] for c in sorted(index["categories"], key=lambda c: c["id"])]
    prompt = ". ".join(names)
    objects = drawn = 0
    for n, sample in enumerate(iter_samples(str(Path(synthetic_shards) / "detection"), split="val")):
        if n >= IMAGES:
            break
        pred = predictor.predict(sample.image, prompt)
        threshold = 0.2  # low enough that most objects carry several phrases to choose from
        image, layout = render_prediction(sample.image, pred, threshold=threshold)
        pixels = np.asarray(image)
        W, H = image.size
        keep = [i for i, s in enumerate(pred.scores.tolist()) if s >= threshold]
        boxes, scores = pred.boxes[keep], pred.scores[keep]
        for lab in layout.labels:
            x0, y0, x1, y1 = lab.rect
            assert 0 <= x0 <= x1 < W and 0 <= y0 <= y1 < H, lab
        iou = box_iou(torch.as_tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4), boxes.float())
        for g in range(iou.shape[0]):
            on_it = (iou[g] >= MATCH_IOU).nonzero().flatten().tolist()
            if not on_it:
                continue
            objects += 1
            top = max(on_it, key=lambda i: float(scores[i]))
            painted = [lab for lab in layout.labels if lab.detection in on_it]
            last = painted[-1]
            assert last.detection == top, (n, g, [(p.text, p.score) for p in painted])
            drawn += len(painted) > 1
            # the top phrase's tag is readable: its colour at its left padding, unless a better object's tag covers it
            later = layout.labels[layout.labels.index(last) + 1 :]
            if not any(_overlaps(last.rect, other.rect) for other in later):
                assert tuple(pixels[last.rect[1] + 1, last.rect[0]]) == color_for(last.label)
    assert objects >= IMAGES  # the model finds most objects at all
    assert drawn >= 1  # and some carry runners-up, so the order was tested


def _overlaps(a, b) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]
