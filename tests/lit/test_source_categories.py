"""Recipe sources can rename a detection set's classes (``categories``), as users do for ODinW-style custom sets:
the prompt and the evaluation then use the new names; malformed overrides are refused naming the source."""

import pytest

from glip_pl.lit.datamodule import GroundingDataModule, Source

RENAMED = [{"id": i, "name": f"thing {chr(96 + i)}"} for i in range(1, 13)]


def test_renamed_classes_reach_the_prompt(synthetic_shards):
    dm = GroundingDataModule(val=[{"urls": f"{synthetic_shards}/detection", "split": "val", "categories": RENAMED}],
                             batch_size=2, num_workers=0, val_size=128, val_max_size=160)
    batch = next(iter(dm.val_dataloader()))
    caption = batch.captions[0]
    assert "thing a" in caption and "thing l" in caption and "circle" not in caption
    assert set(batch.phrase_names[0]) == {c["name"] for c in RENAMED}


@pytest.mark.parametrize("bad, words", [
    ([], "non-empty list"),
    ([{"id": 1}], "categories[0]"),
    ([{"id": "1", "name": "x"}], "categories[0]"),
    ([{"id": 1, "name": " "}], "categories[0]"),
    ([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], "repeats id 1"),
])
def test_malformed_categories_are_refused(bad, words):
    with pytest.raises(ValueError) as e:
        Source(urls="shards/custom", categories=bad)
    assert "shards/custom" in str(e.value) and words in str(e.value)


def test_an_override_missing_a_used_id_names_the_sample(synthetic_shards):
    dm = GroundingDataModule(val=[{"urls": f"{synthetic_shards}/detection", "split": "val",
                                   "categories": RENAMED[:2]}], batch_size=2, num_workers=0, val_size=128,
                             val_max_size=160)
    with pytest.raises(Exception) as e:
        for _ in dm.val_dataloader():
            pass
    assert "category ids" in str(e.value) and "val-" in str(e.value)
