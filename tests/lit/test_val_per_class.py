"""``model.val_per_class``: the validation prints and logs each category's AP, named from the val source, and the
categories' mean is the overall AP (COCO averages over categories with ground truth)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny_fit import SIZE  # noqa: E402

pytestmark = pytest.mark.slow


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
