"""Nothing unsafe is loaded: recipes may name only allow-listed classes; converters and the sample decoder, fuzzed
with hypothesis (random and truncated records, huge numbers, wrong types, unicode captions), raise only the
project's typed errors (``ConversionError`` / ``ShardError``) — never another exception, never a hang."""

import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glip_pl.data.convert_coco import coco_records
from glip_pl.data.convert_grounding import grounding_records
from glip_pl.data.convert_odvg import odvg_records
from glip_pl.data.reader import decode_sample
from glip_pl.data.schema import ConversionError, ShardError
from glip_pl.lit.cli import check_class_paths, class_path_allowed


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10 ** 30), max_value=10 ** 30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                      max_leaves=12)


def _png(w=8, h=6) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
GOOD = {"id": "a", "source": "s", "kind": "grounding", "width": 8, "height": 6, "image": "png",
        "boxes": [[1, 1, 4, 4]], "caption": "a cat ☃ on a mat", "spans": [[[0, 5]]]}


def _mutated(draw_key, draw_value, drop):
    rec = json.loads(json.dumps(GOOD))
    if drop in rec:
        del rec[drop]
    if draw_key is not None:
        rec[draw_key] = draw_value
    return rec


@FUZZ
@given(key=st.one_of(st.none(), st.sampled_from(sorted(GOOD) + ["spans_eval", "category_ids", "scores", "extra"])),
       value=values, drop=st.sampled_from([None] + sorted(GOOD)), cut=st.integers(min_value=0, max_value=400),
       truncate_json=st.booleans(), image=st.sampled_from(["good", "truncated", "random", "none"]),
       junk=st.binary(max_size=40))
def test_decoder_raises_only_shard_errors(key, value, drop, cut, truncate_json, image, junk):
    raw_json = json.dumps(_mutated(key, value, drop), allow_nan=True).encode()
    if truncate_json:
        raw_json = raw_json[:cut]
    raw = {"__key__": "k", "__url__": "u.tar", "json": raw_json}
    if image != "none":
        raw["png"] = {"good": PNG, "truncated": PNG[: len(PNG) // 2], "random": junk}[image]
    try:
        s = decode_sample(raw)
    except ShardError:
        return
    assert s.image.size == (s.width, s.height) and len(s) == s.boxes.shape[0]


def _coco_docs():
    base = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 6}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}],
            "categories": [{"id": 1, "name": "cat ☃"}]}
    return st.fixed_dictionaries({}).map(lambda _: json.loads(json.dumps(base)))


@FUZZ
@given(doc=_coco_docs(), part=st.sampled_from(["images", "annotations", "categories"]),
       field=st.text(max_size=10) | st.sampled_from(["id", "image_id", "category_id", "bbox", "file_name", "width",
                                                     "height", "name", "iscrowd", "caption", "tokens_positive"]),
       value=values, whole=st.booleans(), cut=st.integers(min_value=0, max_value=300), truncate=st.booleans(),
       kind=st.sampled_from(["coco", "grounding"]), on_error=st.sampled_from(["raise", "skip"]))
def test_json_converters_raise_only_conversion_errors(tmp_path_factory, doc, part, field, value, whole, cut, truncate,
                                                      kind, on_error):
    if whole:
        doc[part] = value
    else:
        doc[part][0][field] = value
    text = json.dumps(doc, allow_nan=True)
    if truncate:
        text = text[:cut]
    path = tmp_path_factory.mktemp("fz") / "ann.json"
    path.write_text(text, encoding="utf-8")
    fn = coco_records if kind == "coco" else grounding_records
    try:
        fn(str(path), str(path.parent), on_error=on_error)
    except ConversionError:
        pass


@FUZZ
@given(line=values, cut=st.integers(min_value=0, max_value=200), truncate=st.booleans(),
       on_error=st.sampled_from(["raise", "skip"]))
def test_odvg_converter_raises_only_conversion_errors(tmp_path_factory, line, cut, truncate, on_error):
    good = {"filename": "a.jpg", "height": 6, "width": 8,
            "detection": {"instances": [{"bbox": [1, 1, 3, 3], "label": 0, "category": "cat"}]}}
    text = json.dumps(good) + "\n" + json.dumps(line, allow_nan=True)
    if truncate:
        text = text[:cut]
    path = tmp_path_factory.mktemp("fz") / "a.jsonl"
    path.write_text(text, encoding="utf-8")
    try:
        odvg_records(str(path), str(path.parent), on_error=on_error)
    except ConversionError:
        pass


@pytest.mark.parametrize("path,ok", [
    ("lightning.pytorch.callbacks.ModelCheckpoint", True), ("glip_pl.lit.checkpointing.AtomicModelCheckpoint", True),
    ("lightning.pytorch.loggers.WandbLogger", True), ("ModelCheckpoint", True),
    ("os.system", False), ("builtins.eval", False), ("subprocess.Popen", False),
    ("lightning.pytorch.callbacks.os.system", False), ("glip_pl.lit.cli.run", False), ("a b", False), (3, False)])
def test_class_path_allow_list(path, ok):
    assert class_path_allowed(path) is ok


def test_recipe_with_foreign_class_is_refused_before_import(tmp_path, monkeypatch):
    from glip_pl.lit.cli import run

    for f in Path(__file__).parents[2].glob("recipes/**/*.yaml"):
        check_class_paths(["--config", str(f)])  # every shipped recipe passes
    marker = tmp_path / "imported"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Evil: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tmp_path / "r.yaml"
    cfg.write_text("trainer:\n  callbacks:\n    - class_path: evilmod.Evil\n")
    for args in (["fit", "--config", str(cfg)],
                 ["fit", "--trainer.logger", '{"class_path": "evilmod.Evil"}'],
                 ["fit", "--trainer.callbacks+=evilmod.Evil"],
                 ["fit", "--trainer.strategy.class_path", "evilmod.Evil"]):
        with pytest.raises(SystemExit, match=r"(?s)refusing class_path.*evilmod.Evil"):
            run(args)
    assert not marker.exists(), "the module was imported"
    tag = tmp_path / "tag.yaml"
    tag.write_text("trainer: !!python/object/apply:os.system ['echo owned > %s']\n" % marker)
    with pytest.raises(SystemExit, match="not safe YAML"):
        run(["fit", "--config", str(tag)])
    assert not marker.exists()
