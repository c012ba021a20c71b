"""Bad data at training time, through the real CLI: an undecodable image, malformed json, a box outside the image,
a span outside the caption and a truncated tar are skipped and counted per reason (logged as
``data/skipped/<reason>``); the run fails with a clear message only when the skipped fraction passes
``data.max_skip_fraction``; a shard with a pickle member is refused (never unpickled) even in skip mode."""

import csv
import io
import json
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _recipes import glip_pl, popen, small_recipe  # noqa: E402

from glip_pl.data.reader import expand_urls, iter_raw  # noqa: E402


def _write_tar(path: Path, samples: list) -> None:
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_bad_source(root: Path, shards: str, pickle_member: bool = False) -> str:
    """bad-000000.tar: 2 good grounding samples and 8 bad ones (2 per reason); bad-000001.tar: a truncated shard."""
    root.mkdir(parents=True, exist_ok=True)
    good = list(iter_raw(expand_urls(f"{shards}/grounding", "train")[0]))
    out = [dict(s) for s in good[:2]]
    bad = []
    for i in range(2):  # two of each kind
        b = [dict(s) for s in good[2 + 4 * i: 6 + 4 * i]]
        b[0]["jpg"] = b"\xff\xd8 not really a jpeg"                                     # undecodable image
        b[1]["json"] = b'{"id": "x", "kind": "grounding", '                               # malformed json
        rec = json.loads(b[2]["json"])
        rec["boxes"][0] = [0, 0, rec["width"] + 500, 10]                                  # box outside the image
        b[2]["json"] = json.dumps(rec).encode()
        rec = json.loads(b[3]["json"])
        rec["spans"][0] = [[0, len(rec["caption"]) + 40]]                                 # span outside the caption
        b[3]["json"] = json.dumps(rec).encode()
        bad += b
    if pickle_member:  # every sample of the shard carries one, so the first one read is refused
        for x in out + bad:
            x["pyd"] = b"cos\nsystem\n(S'echo owned'\ntR."
    _write_tar(root / "bad-000000.tar", out + bad)
    whole = Path(expand_urls(f"{shards}/grounding", "train")[1]).read_bytes()
    (root / "bad-000001.tar").write_bytes(whole[: len(whole) // 6])                    # truncated tar
    return f"{root}/bad-{{000000..000001}}.tar"


def _sources(shards, bad):
    return f"    - urls: {shards}/detection\n    - urls: '{bad}'\n      weight: 3.0\n"


def _logged(run: Path) -> dict:
    rows = []
    for f in run.rglob("metrics.csv"):
        rows += list(csv.DictReader(f.open()))
    out = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("data/skipped/") and v:
                out[k] = max(out.get(k, 0), float(v))
    return out


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, synthetic_shards):
    bad = make_bad_source(tmp_path / "bad", synthetic_shards)
    cfg = small_recipe(tmp_path, synthetic_shards, steps=8, train_sources=_sources(synthetic_shards, bad),
                       extra_data="steps_per_epoch: 100\nmax_skip_fraction: 0.9\nskip_check_min_samples: 1\n")
    cfg2 = small_recipe(tmp_path, synthetic_shards, steps=8, train_sources=_sources(synthetic_shards, bad),
                        name="strict",
                        extra_data="steps_per_epoch: 100\nmax_skip_fraction: 0.01\nskip_check_min_samples: 1\n")
    p1, p2 = popen("fit", "--config", str(cfg)), popen("fit", "--config", str(cfg2))  # both at once
    (_, err1), (_, err2) = p1.communicate(timeout=400), p2.communicate(timeout=400)
    assert p1.returncode == 0, err1[-4000:]
    logged = _logged(tmp_path / "run")
    print(logged)
    assert {"data/skipped/bad_image", "data/skipped/bad_json", "data/skipped/bad_annotation",
            "data/skipped/unreadable_shard"} <= set(logged), logged

    # the same data with a 1% limit: a clear failure naming the fraction, the limit and the reasons
    assert p2.returncode != 0
    assert "too much bad data" in err2 and "data.max_skip_fraction=0.01" in err2, err2[-3000:]


def test_pickle_member_is_refused_at_training_time(tmp_path, synthetic_shards):
    bad = make_bad_source(tmp_path / "bad", synthetic_shards, pickle_member=True)
    cfg = small_recipe(tmp_path, synthetic_shards, steps=2, train_sources=_sources(synthetic_shards, bad),
                       extra_data="steps_per_epoch: 100\nmax_skip_fraction: 1.0\n")
    r = glip_pl("fit", "--config", str(cfg))
    assert r.returncode != 0
    assert "pickle-based members are refused" in r.stderr, r.stderr[-3000:]
    assert "owned" not in r.stdout
