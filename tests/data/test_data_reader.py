"""Reader: decoded samples, url forms, and the safe decoder that never unpickles."""

import io
import json
import pickle
import tarfile

import pytest
import torch

from glip_pl.data import ShardError, iter_samples
from glip_pl.data.reader import decode_sample, expand_urls, iter_raw


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _png(w=8, h=6):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _rec(**kw):
    rec = {"id": "a", "source": "t", "kind": "detection", "width": 8, "height": 6, "boxes": [[0, 0, 4, 3]],
           "category_ids": [2], "image": "png"}
    rec.update(kw)
    return json.dumps(rec).encode()


def test_iter_samples_gives_pil_images_and_float_boxes(synthetic_shards):
    samples = list(iter_samples(f"{synthetic_shards}/grounding", split="val"))
    assert len(samples) == 32
    s = samples[0]
    assert s.image.mode == "RGB" and s.image.size == (s.width, s.height) == (256, 256)
    assert s.boxes.dtype.is_floating_point and s.boxes.shape == (len(s.spans), 4)
    assert s.kind == "grounding" and s.caption and s.source == "synthetic-grounding"
    det = next(iter_samples(f"{synthetic_shards}/detection/val-000000.tar"))
    assert det.kind == "detection" and len(det.category_ids) == len(det.boxes)


def test_url_forms(synthetic_shards):
    d = f"{synthetic_shards}/detection"
    assert expand_urls(d, "train") == [f"{d}/train-{i:06d}.tar" for i in range(6)]
    assert expand_urls(f"{d}/train-{{000000..000002}}.tar") == [f"{d}/train-{i:06d}.tar" for i in range(3)]
    assert expand_urls([f"{d}/val-000000.tar"]) == [f"{d}/val-000000.tar"]
    with pytest.raises(ShardError, match="no shards"):
        expand_urls(d, "test")
    with pytest.raises(ShardError, match=f"{d}-typo: .*'shards': no such directory or shard file"):
        expand_urls(f"{d}-typo", "train")
    assert expand_urls("pipe:cat a.tar") == ["pipe:cat a.tar"]  # remote/pipe urls are opened later, not checked


@pytest.mark.parametrize("ext", ["pyd", "pickle"])
def test_pickle_members_are_refused_never_unpickled(tmp_path, monkeypatch, ext):
    called = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: called.append(1))
    payload = pickle.dumps({"boom": 1})
    url = _tar(tmp_path / "evil.tar", [("k.png", _png()), ("k.json", _rec()), (f"k.{ext}", payload)])
    with pytest.raises(ShardError) as e:
        list(iter_samples(url))
    assert e.value.field == ext and e.value.url == url and "pickle" in str(e.value)
    assert not called


def test_unknown_members_are_ignored_and_records_checked(tmp_path):
    url = _tar(tmp_path / "a.tar", [("k.png", _png()), ("k.json", _rec()), ("k.txt", b"hello")])
    (s,) = list(iter_samples(url))
    assert s.category_ids == [2] and s.boxes.tolist() == [[0, 0, 4, 3]]
    bad = _tar(tmp_path / "b.tar", [("k.png", _png(9, 6)), ("k.json", _rec())])
    with pytest.raises(ShardError, match="9x6"):
        list(iter_samples(bad))
    broken = _tar(tmp_path / "c.tar", [("k.png", b"not an image"), ("k.json", _rec())])
    with pytest.raises(ShardError, match="undecodable"):
        list(iter_samples(broken))


def test_raw_grouping_by_key(tmp_path):
    url = _tar(tmp_path / "a.tar", [("x/1.png", b"1"), ("x/1.json", b"{}"), ("x/2.png", b"2")])
    raw = list(iter_raw(url))
    assert [r["__key__"] for r in raw] == ["x/1", "x/2"] and raw[0]["json"] == b"{}"
    with pytest.raises(ShardError, match="json"):
        decode_sample(raw[1])


def _grounding_rec(**kw):
    rec = {"id": "g1", "source": "pseudo", "kind": "grounding", "width": 8, "height": 6, "image": "png",
           "caption": "a cat and a dog", "boxes": [[0, 0, 4, 3]], "spans": [[[0, 5]]],
           "ignore_boxes": [[1, 1, 8, 6], [0, 0, 8, 6]], "ignore_spans": [[[10, 15]], [[0, 5], [10, 15]]]}
    rec.update(kw)
    return json.dumps(rec).encode()


def test_ignore_regions_are_read_and_checked(tmp_path):
    url = _tar(tmp_path / "a.tar", [("k.png", _png()), ("k.json", _grounding_rec())])
    (s,) = list(iter_samples(url))
    assert s.ignore_boxes.tolist() == [[1, 1, 8, 6], [0, 0, 8, 6]] and s.ignore_boxes.dtype == torch.float32
    assert s.ignore_spans == [[(10, 15)], [(0, 5), (10, 15)]]
    (plain,) = list(iter_samples(_tar(tmp_path / "p.tar", [("k.png", _png()), ("k.json", _rec())])))
    assert plain.ignore_boxes is None and plain.ignore_spans is None
    cases = [  # (record fields, error field, message part)
        ({"ignore_spans": [[[10, 15]]]}, "ignore_spans", "same length"),
        ({"ignore_spans": None}, "ignore_spans", "same length"),
        ({"ignore_boxes": [[1, 1, 1, 6], [0, 0, 8, 6]]}, "ignore_boxes[0]", "degenerate"),
        ({"ignore_boxes": [[1, 1, 8, 6], [0, 0, 80, 6]]}, "ignore_boxes[1]", "outside"),
        ({"ignore_spans": [[[10, 15]], [[0, 50]]]}, "ignore_spans[1]", "a cat and a dog"),
        ({"ignore_spans": [[[10, 15]], []]}, "ignore_spans[1]", "span"),
    ]
    for i, (fields, field, part) in enumerate(cases):
        bad = _tar(tmp_path / f"b{i}.tar", [("k.png", _png()), ("k.json", _grounding_rec(**fields))])
        with pytest.raises(ShardError, match=part) as e:
            list(iter_samples(bad))
        assert e.value.field == f"json.{field}" and e.value.url == bad, (fields, str(e.value))
    det = _tar(tmp_path / "d.tar", [("k.png", _png()), ("k.json", _rec(ignore_boxes=[[0, 0, 2, 2]],
                                                                        ignore_spans=[[[0, 1]]]))])
    with pytest.raises(ShardError, match="grounding samples") as e:
        list(iter_samples(det))
    assert e.value.field == "json.ignore_boxes"
