"""Shard writer: byte-identical output for any process count, target sizes, resume after a crash, index.json."""

import hashlib
import io
import json
import os

import pytest

from glip_pl.data.schema import Where
from glip_pl.data.writer import plan_shards, read_index, write_split


def _build(record):
    """Module-level build function (worker processes import it): a solid PNG and a detection record."""
    from PIL import Image

    if record.get("crash"):
        raise RuntimeError("simulated crash")
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (record["n"] % 256, 10, 10)).save(buf, format="PNG")
    rec = {"id": record["id"], "source": "toy", "kind": "detection", "width": 32, "height": 24,
           "boxes": [[1.0, 2.0, 30.0, 20.0]], "category_ids": [1]}
    return rec, buf.getvalue(), "png", Where("toy.json", record["id"]), "<mem>"


def _records(n, crash_at=None):
    return [{"id": f"r-{i}", "n": i, "size_hint": 1000, "crash": i == crash_at} for i in range(n)]


def _digests(d):
    return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(d)) if n.endswith(".tar")}


def test_plan_by_target_bytes_and_count():
    assert plan_shards([100] * 10, target_bytes=3 * (100 + 1536)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert plan_shards([10] * 5, target_bytes=10 ** 9, max_count=2) == [[0, 1], [2, 3], [4]]


def test_same_bytes_for_any_number_of_processes(tmp_path):
    kw = dict(source="toy", kind="detection", categories=[{"id": 1, "name": "thing"}], max_count=7, progress=False)
    a = write_split(str(tmp_path / "a"), "train", _records(30), _build, num_workers=1, **kw)
    b = write_split(str(tmp_path / "b"), "train", _records(30), _build, num_workers=2, **kw)
    assert a["count"] == b["count"] == 30 and len(a["shards"]) == 5
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    index = read_index(str(tmp_path / "a"))
    assert index["schema_version"] == 1 and index["source"] == "toy" and index["kind"] == "detection"
    assert index["categories"] == [{"id": 1, "name": "thing"}]
    assert [s["count"] for s in index["splits"]["train"]["shards"]] == [7, 7, 7, 7, 2]
    assert not [n for n in os.listdir(tmp_path / "a") if n.startswith(".")]  # no temporaries or sidecars left


def test_resume_after_a_crash_rewrites_only_missing_shards(tmp_path):
    out = str(tmp_path / "s")
    kw = dict(source="toy", kind="detection", max_count=5, num_workers=1, progress=False)
    with pytest.raises(RuntimeError, match="simulated"):
        write_split(out, "train", _records(20, crash_at=12), _build, **kw)
    stage = os.path.join(out, ".train.staging")  # nothing is published before the whole split is written
    assert not [n for n in os.listdir(out) if n.endswith(".tar")] and "index.json" not in os.listdir(out)
    done = sorted(n for n in os.listdir(stage) if n.endswith(".tar"))
    assert done == ["train-000000.tar", "train-000001.tar"]  # finished shards only, under their final names
    assert not [n for n in os.listdir(stage) if ".tmp" in n]
    before = {n: os.stat(os.path.join(stage, n)).st_mtime_ns for n in done}
    entry = write_split(out, "train", _records(20), _build, **kw)
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in done} == before  # skipped on resume, then moved
    assert not os.path.exists(stage)
    fresh = str(tmp_path / "fresh")
    assert entry == write_split(fresh, "train", _records(20), _build, **kw)
    assert _digests(out) == _digests(fresh)
    # a re-run of a finished conversion is a no-op; another conversion into the same folder needs --overwrite
    assert write_split(out, "train", _records(20), _build, **kw) == entry
    with pytest.raises(FileExistsError, match="overwrite"):
        write_split(out, "train", _records(21), _build, **kw)
    assert write_split(out, "train", _records(21), _build, overwrite=True, **kw)["count"] == 21


def test_index_merges_splits(tmp_path):
    out = str(tmp_path)
    kw = dict(source="toy", kind="detection", progress=False, num_workers=1)
    write_split(out, "train", _records(4), _build, **kw)
    write_split(out, "val", _records(2), _build, **kw)
    index = json.load(open(os.path.join(out, "index.json")))
    assert {k: v["count"] for k, v in index["splits"].items()} == {"train": 4, "val": 2}


def test_shards_are_plain_webdataset(tmp_path):
    import webdataset as wds

    write_split(str(tmp_path), "train", _records(3), _build, source="toy", kind="detection", progress=False,
                num_workers=1)
    ds = wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False)
    items = list(ds)
    assert [x["__key__"] for x in items] == ["000000000", "000000001", "000000002"]
    assert json.loads(items[0]["json"])["id"] == "r-0" and items[0]["png"][:4] == b"\x89PNG"


def test_pseudo_labelled_samples_round_trip(tmp_path):
    from glip_pl.data import ConversionError, iter_samples
    from glip_pl.data.writer import write_samples

    img = _build({"id": "x", "n": 1})[1]
    rec = {"id": "cc-1", "source": "cc3m-pseudo", "kind": "grounding", "width": 32, "height": 24,
           "boxes": [[1, 1, 9, 9], [2, 2, 30, 20]], "caption": "a dog and a ball", "spans": [[[0, 5]], [[10, 16]]],
           "scores": [0.91, 0.62], "provenance": {"teacher": "glip-t", "checkpoint": "abc", "threshold": 0.5}}
    write_samples(str(tmp_path), "train", [{"json": rec, "image": img, "ext": "png"}], source="cc3m-pseudo",
                  kind="grounding", num_workers=1, progress=False)
    (s,) = list(iter_samples(str(tmp_path)))
    assert s.scores == [0.91, 0.62] and s.provenance["teacher"] == "glip-t" and s.spans == [[(0, 5)], [(10, 16)]]
    bad = dict(rec, scores=[0.9])
    with pytest.raises(ConversionError) as e:
        write_samples(str(tmp_path / "b"), "train", [{"json": bad, "image": img, "ext": "png"}], source="p",
                      kind="grounding", num_workers=1, progress=False)
    assert e.value.field == "scores"


def test_public_pieces_write_the_bytes_write_split_writes(tmp_path):
    """Shards written outside this module (the pseudo-label job's) use add_member / shard_name / dumps: the same
    records give the very bytes of write_split's shard, so there is one shard format."""
    import tarfile

    from glip_pl.data.schema import SCHEMA_VERSION
    from glip_pl.data.writer import add_member, dumps, shard_name

    write_split(str(tmp_path / "ref"), "train", _records(3), _build, source="toy", kind="detection", num_workers=1,
                progress=False)
    name = shard_name("train", 0)
    (tmp_path / "own").mkdir()
    with tarfile.open(tmp_path / "own" / name, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, r in enumerate(_records(3)):
            rec, image, ext, _, _ = _build(r)
            rec.update(schema=SCHEMA_VERSION, image=ext)
            add_member(tar, f"{i:09d}.{ext}", image)
            add_member(tar, f"{i:09d}.json", dumps(rec).encode("utf-8"))
    assert (tmp_path / "own" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
