"""Caption converter: tsv/csv/jsonl/parquet tables and img2dataset output (image bytes copied, not re-encoded)."""

import csv
import io
import json
import os
import tarfile

import pytest

from glip_pl.data import ConversionError, iter_samples
from glip_pl.data.convert_captions import convert_captions

ROWS = [("k0", "im/0.jpg", "a photo of a dog"), ("k1", "im/1.png", "two cats, left and right"),
        ("k2", "im/2.jpg", "ünïcode caption\twith tab")]


def _images(root, make_image):
    for _, path, _ in ROWS:
        make_image(os.path.join(root, path), 33, 21)


def _table(root, fmt):
    path = os.path.join(root, f"t.{fmt}")
    if fmt == "jsonl":
        with open(path, "w") as f:
            for k, im, cap in ROWS:
                f.write(json.dumps({"key": k, "image": im, "caption": cap}) + "\n")
    else:
        with open(path, "w", newline="") as f:
            w = csv.writer(f, delimiter="," if fmt == "csv" else "\t")
            w.writerow(["key", "image", "caption"])
            w.writerows(ROWS)
    return path


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl"])
def test_table_round_trip(tmp_path, make_image, fmt):
    root = str(tmp_path)
    _images(root, make_image)
    entry = convert_captions(f"{root}/out", "train", table=_table(root, fmt), images_dir=root, id_col="key",
                             num_workers=1, progress=False)
    assert entry["count"] == 3
    got = {s.id: s for s in iter_samples(f"{root}/out")}
    for k, im, cap in ROWS:
        assert got[k].kind == "caption" and got[k].caption == cap and len(got[k].boxes) == 0
        assert (got[k].width, got[k].height) == (33, 21) and got[k].extra["image"] == im


def test_headerless_tsv_and_bad_rows(tmp_path, make_image, shards_cli, capsys):
    root = str(tmp_path)
    _images(root, make_image)
    path = os.path.join(root, "cc3m.tsv")
    with open(path, "w") as f:  # the CC3M layout: caption<TAB>image, no header
        f.write("a dog\tim/0.jpg\n\tim/1.png\na cat\tim/missing.jpg\n")
    argv = ["captions", "--table", path, "--images", root, "--columns", "caption,image", "--out", f"{root}/o",
            "--no-progress", "--workers", "1"]
    assert shards_cli(argv) == 1
    err = capsys.readouterr().err
    assert path in err and "row 1" in err and "'caption'" in err and "empty_caption" in err
    assert shards_cli(argv + ["--on-error", "skip", "--overwrite"]) == 0
    out = json.load(open(f"{root}/o/index.json"))["splits"]["train"]
    assert out["count"] == 1 and out["skipped"] == {"empty_caption": 1, "missing_image": 1}


def test_parquet_needs_pyarrow_or_round_trips(tmp_path, make_image):
    root = str(tmp_path)
    _images(root, make_image)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        open(f"{root}/t.parquet", "wb").write(b"PAR1")
        with pytest.raises(ImportError, match="pyarrow"):
            convert_captions(f"{root}/out", "train", table=f"{root}/t.parquet", images_dir=root, progress=False)
        return
    pq.write_table(pa.table({"key": [r[0] for r in ROWS], "image": [r[1] for r in ROWS],
                             "caption": [r[2] for r in ROWS]}), f"{root}/t.parquet")
    convert_captions(f"{root}/out", "train", table=f"{root}/t.parquet", images_dir=root, id_col="key",
                     num_workers=1, progress=False)
    assert sorted((s.id, s.caption) for s in iter_samples(f"{root}/out")) == [(k, c) for k, _, c in ROWS]


def _img2dataset(root, make_image, n=5, per_tar=3):
    """What img2dataset --output_format webdataset writes: NNNNN.tar with key.jpg/.txt/.json (+ parquet, stats)."""
    os.makedirs(f"{root}/i2d", exist_ok=True)
    originals = {}
    for t in range(-(-n // per_tar)):
        with tarfile.open(f"{root}/i2d/{t:05d}.tar", "w") as tar:
            for i in range(t * per_tar, min(n, (t + 1) * per_tar)):
                key = f"{t:05d}{i:04d}"
                data = open(make_image(f"{root}/src/{i}.jpg", 30 + i, 20), "rb").read()
                originals[key] = data
                meta = {"url": f"http://x/{i}.jpg", "caption": f"caption {i}", "key": key, "status": "success",
                        "width": 30 + i, "height": 20, "original_width": 300, "original_height": 200}
                for ext, payload in (("jpg", data), ("txt", f"caption {i}".encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        open(f"{root}/i2d/{t:05d}_stats.json", "w").write("{}")
    return originals


def test_img2dataset_bytes_are_copied_not_reencoded(tmp_path, make_image):
    root = str(tmp_path)
    originals = _img2dataset(root, make_image)
    entry = convert_captions(f"{root}/out", "train", img2dataset=f"{root}/i2d", num_workers=2, progress=False,
                             target_bytes=2000)
    assert entry["count"] == 5 and len(entry["shards"]) > 1
    stored = {}
    for name in sorted(os.listdir(f"{root}/out")):
        if name.endswith(".tar"):
            with tarfile.open(f"{root}/out/{name}") as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for mname, data in members.items():
                if mname.endswith(".json"):
                    rec = json.loads(data)
                    stored[rec["id"]] = members[mname.replace(".json", ".jpg")]
    assert stored == originals
    s = {x.id: x for x in iter_samples(f"{root}/out")}
    assert s["000000001"].caption == "caption 1" and s["000000001"].extra["url"] == "http://x/1.jpg"
    assert (s["000000001"].width, s["000000001"].height) == (31, 20)


def test_img2dataset_sample_without_image_is_an_error(tmp_path, make_image):
    root = str(tmp_path)
    _img2dataset(root, make_image, n=2)
    with tarfile.open(f"{root}/i2d/00001.tar", "w") as tar:
        info = tarfile.TarInfo("000010009.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cap"))
    with pytest.raises(ConversionError) as e:
        convert_captions(f"{root}/out", "train", img2dataset=f"{root}/i2d", num_workers=1, progress=False)
    assert e.value.code == "missing_image" and e.value.record == "key 000010009"
    assert e.value.file.endswith("00001.tar")
