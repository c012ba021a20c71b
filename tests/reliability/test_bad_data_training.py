"""Bad data at training time, through the real CLI: an undecodable image, malformed json, a box outside the image,
a span outside the caption and a truncated tar are skipped and counted per reason (logged as
``data/skipped/<reason>``); the run fails with a clear message only when the skipped fraction passes
``data.max_skip_fraction``; a shard with a pickle member is refused (never unpickled) even in skip mode."""

import csv
import io
import json
import tarfile
from pathlib import Path

from helpers.cli import glip_pl, popen
from helpers.recipe import tiny_recipe

from glip_pl.data.mix import WeightedSchedule
from glip_pl.data.reader import expand_urls, iter_raw

STEPS, BATCH = 8, 2
# one source per skip reason, so that the mix's fixed schedule says how many of each the run draws
REASONS = ("bad_image", "bad_json", "bad_annotation")
WEIGHTS = (1.0, 1.0, 1.0, 2.0)  # good detection, then the REASONS' sources


def _write_tar(path: Path, samples: list) -> None:
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_bad_sources(root: Path, shards: str, pickle_member: bool = False) -> list:
    """The urls of three sources, each of 4 grounding samples broken one way: undecodable images; malformed json;
    2 boxes outside the image + 2 spans outside the caption, and beside them a truncated copy of that shard (cut
    in its third sample's data, so whatever it yields is one of those bad annotations; a cut in a header would read
    as the end of the archive)."""
    good = list(iter_raw(expand_urls(f"{shards}/grounding", "train")[0]))
    broken = {reason: [dict(s) for s in good[4 * i: 4 * i + 4]] for i, reason in enumerate(REASONS)}
    for s in broken["bad_image"]:
        s["jpg"] = b"\xff\xd8 not really a jpeg"
    for s in broken["bad_json"]:
        s["json"] = b'{"id": "x", "kind": "grounding", '
    for k, s in enumerate(broken["bad_annotation"]):
        rec = json.loads(s["json"])
        if k % 2:
            rec["spans"][0] = [[0, len(rec["caption"]) + 40]]
        else:
            rec["boxes"][0] = [0, 0, rec["width"] + 500, 10]
        s["json"] = json.dumps(rec).encode()
    urls = []
    for reason, samples in broken.items():
        d = root / reason
        d.mkdir(parents=True, exist_ok=True)
        if pickle_member:  # every sample carries one, so the first one read is refused
            samples = [{**x, "pyd": b"cos\nsystem\n(S'echo owned'\ntR."} for x in samples]
        _write_tar(d / "bad-000000.tar", samples)
        urls.append(f"{d}/bad-000000.tar")
    whole = root / "bad_annotation" / "bad-000000.tar"
    with tarfile.open(whole) as tar:
        third = [m for m in tar.getmembers() if m.name.startswith(good[10]["__key__"] + ".")][0].offset
    (root / "bad_annotation" / "bad-000001.tar").write_bytes(whole.read_bytes()[: third + 512 + 10])
    urls[-1] = f"{root}/bad_annotation/bad-{{000000..000001}}.tar"
    return urls


def _sources(shards, bad):
    return [{"urls": f"{shards}/detection", "weight": WEIGHTS[0]}] + [
        {"urls": u, "weight": w} for u, w in zip(bad, WEIGHTS[1:])]


def expected_skips(kept: int) -> dict:
    """Draws of each bad source up to the one that completes ``kept`` good samples (the mix's schedule)."""
    sched, n = WeightedSchedule(WEIGHTS), [0] * len(WEIGHTS)
    while n[0] < kept:
        n[sched.next()] += 1
    return {f"data/skipped/{r}": float(c) for r, c in zip(REASONS, n[1:])}


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
    bad = make_bad_sources(tmp_path / "bad", synthetic_shards)
    data = {"train": _sources(synthetic_shards, bad), "batch_size": BATCH, "steps_per_epoch": 100,
            "skip_check_min_samples": 1}
    cfg = tiny_recipe(tmp_path, synthetic_shards, steps=STEPS, data={**data, "max_skip_fraction": 0.9})
    cfg2 = tiny_recipe(tmp_path, synthetic_shards, "strict", steps=STEPS, data={**data, "max_skip_fraction": 0.01})
    p1, p2 = popen("fit", *cfg.args), popen("fit", *cfg2.args)  # both at once
    (_, err1), (_, err2) = p1.communicate(timeout=400), p2.communicate(timeout=400)
    assert p1.returncode == 0, err1[-4000:]
    logged = _logged(tmp_path / "run")
    print(logged)
    # every bad sample drawn up to the last step's batch, under its own reason; a truncated tar counts once per read
    # (the shuffle buffer reads ahead of the draws, so how often is not fixed)
    unreadable = logged.pop("data/skipped/unreadable_shard", 0)
    assert logged == expected_skips(STEPS * BATCH) and unreadable >= 1, (logged, unreadable)

    # the same data with a 1% limit: a clear failure naming the fraction, the limit and the reasons
    assert p2.returncode != 0
    assert "too much bad data" in err2 and "data.max_skip_fraction=0.01" in err2, err2[-3000:]


def test_pickle_member_is_refused_at_training_time(tmp_path, synthetic_shards):
    bad = make_bad_sources(tmp_path / "bad", synthetic_shards, pickle_member=True)
    cfg = tiny_recipe(tmp_path, synthetic_shards, steps=2,
                      data={"train": _sources(synthetic_shards, bad), "steps_per_epoch": 100,
                            "max_skip_fraction": 1.0})
    r = glip_pl("fit", *cfg.args)
    assert r.returncode != 0
    assert "pickle-based members are refused" in r.stderr, r.stderr[-3000:]
    assert "owned" not in r.stdout
