"""``model.val_per_class``: the validation prints and logs each category's AP, named from the val source, and the
categories' mean is the overall AP (COCO averages over categories with ground truth)."""

import pytest
from helpers.pretrained import SIZE


@pytest.mark.slow
def test_val_per_class_logs_every_category_and_averages_to_ap(pretrained_tiny, synthetic_shards, capsys):
    import lightning as L

    from glip_pl.data.synthetic import CATEGORIES
    from glip_pl.lit.datamodule import GroundingDataModule
    from glip_pl.lit.module import GLIPLitModule

    dm = GroundingDataModule(val=[{"urls": f"{synthetic_shards}/detection", "split": "val"}], batch_size=4,
                             num_workers=0, val_size=SIZE, val_max_size=SIZE)
    assert dm.val_category_names() == {c["id"]: c["name"] for c in CATEGORIES}
    lit = GLIPLitModule(preset="tiny", init_weights=str(pretrained_tiny[1]), val_per_class=True)
    trainer = L.Trainer(accelerator="cpu", limit_val_batches=8, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.validate(lit, datamodule=dm)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    per = {int(k.rsplit("/", 1)[1]): v for k, v in logged.items() if k.startswith("val/AP_per_class/")}
    assert sorted(per) == [c["id"] for c in CATEGORIES]  # every class has val boxes in 32 scenes
    assert logged["val/AP"] > 0.1 and len(set(per.values())) > 3  # a trained model: APs differ by class
    assert sum(per.values()) / len(per) == pytest.approx(logged["val/AP"], abs=1e-6)
    table = capsys.readouterr().out
    for c in CATEGORIES:
        assert any(ln.split()[:1] == [str(c["id"])] and c["name"] in ln for ln in table.splitlines()), c


def test_box_ap_per_category_names_and_the_no_detection_case():
    from glip_pl.lit.metrics import box_ap

    gt = [("a", (20, 20), [[0, 0, 5, 5], [10, 10, 18, 18]], [3, 7]), ("b", (20, 20), [[2, 2, 9, 9]], [3])]
    empty = box_ap(gt, [], per_category=True, names={3: "cat", 7: "dog"})
    assert empty["AP"] == 0.0 and empty["per_category"] == {
        3: {"name": "cat", "AP": 0.0, "AP50": 0.0, "AP75": 0.0, "instances": 2},
        7: {"name": "dog", "AP": 0.0, "AP50": 0.0, "AP75": 0.0, "instances": 1}}
    # cat found in image a only (AP 0.5: one of its two boxes), dog found exactly; an unnamed id keeps its number
    got = box_ap(gt, [("a", [[0, 0, 5, 5], [10, 10, 18, 18], [0, 10, 4, 14]], [0.9, 0.8, 0.7], [3, 7, 11]),
                      ("b", [], [], [])], per_category=True, names={3: "cat", 7: "dog"})
    per = got["per_category"]
    assert per[3]["AP"] == pytest.approx(0.5, abs=0.01) and per[7]["AP"] == pytest.approx(1.0)
    assert per[11] == {"name": "11", "AP": None, "AP50": None, "AP75": None, "instances": 0}
    assert got["AP"] == pytest.approx((per[3]["AP"] + per[7]["AP"]) / 2)
