"""Recipes as a base plus one short delta per paper row (``__base__``, glip_pl.lit.recipes).

* Every shipped recipe parses, through the production parser, to the config it gave before the recipes were split
  into bases and deltas (``tests/fixtures/recipes_main.json``, snapshotted from main, command in the file), with the
  run paths derived from ``trainer.default_root_dir`` (glip_pl.lit.run_dir) — apart from the differences listed in
  ``INTENDED``.
* Each pretraining row, composed, holds what its paper row needs (``PAPER_ROWS``).
* A missing base, a cycle, a base that is not a mapping and an inline ``__base__`` are one clear error naming the
  file; a base cannot smuggle a class outside the allow-list.

Snapshot (run once on main's code and recipes, from an export of main):
    git archive main | tar -x -C /tmp/old-recipes && cp tests/lit/test_recipe_composition.py /tmp/old-recipes/tests/lit/
    cd /tmp/old-recipes && PYTHONPATH=src python tests/lit/test_recipe_composition.py OUT.json
"""

import functools
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from glip_pl.lit.cli import GLIPCLI
from glip_pl.lit.datamodule import GroundingDataModule
from glip_pl.lit.module import GLIPLitModule

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "recipes_main.json"

# name -> the --config files, in order (each recipe alone; the stacks the README and cluster headers name)
STACKS = {
    **{f"pretrain/{r}": [f"recipes/pretrain/{r}.yaml"]
       for r in ("glip_t_a", "glip_t_b", "glip_t_c", "glip_t", "glip_l")},
    **{f"finetune/{r}": [f"recipes/finetune/{r}.yaml"] for r in ("coco", "odinw_custom", "prompt_tuning")},
    "local/cpu_smoke": ["recipes/local/cpu_smoke.yaml"],
    "local/demo": ["recipes/local/demo.yaml"],
    "label/student_synthetic": ["recipes/local/demo.yaml", "recipes/label/student_synthetic.yaml"],
    "ddp_multi_node+glip_t_c": ["recipes/cluster/ddp_multi_node.yaml", "recipes/pretrain/glip_t_c.yaml"],
    "fsdp+glip_l": ["recipes/cluster/fsdp.yaml", "recipes/pretrain/glip_l.yaml"],
    "deepspeed_zero2+glip_t": ["recipes/cluster/deepspeed_zero2.yaml", "recipes/pretrain/glip_t.yaml"],
}

# (stack, dotted key) -> (main's value, the value now): what deriving the run from one directory changed on purpose
INTENDED = {
    # W&B run name: the run directory's name where the recipe names none (was W&B's random name)
    ("local/cpu_smoke", "trainer.logger.init_args.name"): (None, "cpu_smoke"),
    # the student stacked on the demo wrote its W&B run, wandb_run_id and config.yaml into the teacher's runs/demo
    ("label/student_synthetic", "trainer.logger.init_args.save_dir"): ("runs/demo", "runs/student_synthetic"),
    ("label/student_synthetic", "trainer.logger.init_args.name"): ("demo", "student_synthetic"),
}


class ParseOnly(GLIPCLI):
    def instantiate_classes(self) -> None:
        pass


@functools.lru_cache(maxsize=1)
def _parser():
    return ParseOnly(GLIPLitModule, GroundingDataModule, args=["--config", str(ROOT / "recipes/local/cpu_smoke.yaml")],
                     run=False).parser


def composed(stack, derive=True) -> dict:
    """The parsed config of ``--config`` each file of ``stack``, as plain data (the list of config files left out)."""
    parser = _parser()
    cfg = parser.parse_args([a for f in stack for a in ("--config", str(ROOT / f))])
    if derive:
        from glip_pl.lit.run_dir import derive_run_paths

        derive_run_paths(cfg)
    out = yaml.safe_load(parser.dump(cfg))  # None values left out
    out.pop("config", None)
    return out


def _flat(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flat(v, f"{prefix}{k}.")
    elif isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        for i, v in enumerate(d):
            yield from _flat(v, f"{prefix[:-1]}[{i}].")
    else:
        yield prefix[:-1], d


@pytest.mark.parametrize("name", sorted(STACKS))
def test_composed_recipes_equal_main(name):
    old = dict(_flat(json.loads(FIXTURE.read_text())["configs"][name]))
    new = dict(_flat(composed(STACKS[name])))
    intended = {k: v for (n, k), v in INTENDED.items() if n == name}
    for key, (was, now) in intended.items():
        assert (old.get(key), new.get(key)) == (was, now), (name, key)
    # keys only in the new config are arguments added to the code since the snapshot, not recipe values
    diff = {k: (old[k], new.get(k, "<absent>")) for k in old
            if k not in intended and old[k] != new.get(k, "<absent>")}
    assert not diff, f"{name}: differs from main: {diff}"


def test_the_recipes_write_their_run_path_once():
    """The run path was written 3-4 times per recipe (root, logger, checkpoints, run name); now once."""
    for f in sorted((ROOT / "recipes").rglob("*.yaml")):
        if "label" in f.parts and "teacher:" in f.read_text():
            continue  # pseudo-labelling jobs: no run directory
        body = "\n".join(ln.split("#")[0] for ln in f.read_text().splitlines())
        root = re.search(r"default_root_dir:\s*(\S+)", body)
        assert not re.search(r"^\s*(save_dir|dirpath):", body, re.M), f"{f.name}: a run path besides default_root_dir"
        if root:
            assert body.count(root[1]) == 1, f"{f.name}: the run path more than once"


# What each paper row needs (GLIP paper Table 1/2; ../shared/reference/glip_official.md): preset, the gold sources
# and the pseudo-labelled caption source of its pretraining data, its schedule and optimiser settings, the zero-shot
# COCO AP its header quotes.
PAPER_ROWS = {
    "glip_t_a": dict(preset="glip_t_a", ap=42.9, gold={"o365"}, pseudo=None, max_steps=285000, weight_decay=1e-4,
                     swin="timm/swin_tiny_patch4_window7_224.ms_in1k", batch=2, ema=True),
    "glip_t_b": dict(preset="glip_t", ap=44.9, gold={"o365"}, pseudo=None, max_steps=285000, weight_decay=1e-4,
                     swin="timm/swin_tiny_patch4_window7_224.ms_in1k", batch=2, ema=True),
    "glip_t_c": dict(preset="glip_t", ap=46.7, gold={"o365", "goldg", "flickr30k"}, pseudo=None, max_steps=570000,
                     weight_decay=1e-4, swin="timm/swin_tiny_patch4_window7_224.ms_in1k", batch=2, ema=True),
    "glip_t": dict(preset="glip_t", ap=46.3, gold={"o365", "goldg", "flickr30k"}, pseudo="cap4m_pseudo",
                   max_steps=1000000, weight_decay=1e-4, swin="timm/swin_tiny_patch4_window7_224.ms_in1k", batch=2,
                   ema=True),
    "glip_l": dict(preset="glip_l", ap=49.8, gold={"o365", "openimages", "vg", "imagenet_boxes", "goldg", "flickr30k"},
                   pseudo="cap24m_pseudo", max_steps=1000000, weight_decay=0.01,
                   swin="timm/swin_large_patch4_window12_384.ms_in22k", batch=1, ema=False),
}


@pytest.mark.parametrize("row", sorted(PAPER_ROWS))
def test_each_paper_row_composes_to_what_the_row_needs(row):
    want = PAPER_ROWS[row]
    path = ROOT / "recipes" / "pretrain" / f"{row}.yaml"
    cfg = composed([f"recipes/pretrain/{row}.yaml"])
    m, t, d = cfg["model"], cfg["trainer"], cfg["data"]
    assert m["preset"] == want["preset"] and m["model_options"]["swin__pretrained"] == want["swin"]
    assert m["model_options"]["text__pretrained"] == "bert-base-uncased" and m["model_options"]["checkpoint_fusion"]
    # official solver: AdamW lr 1e-4, language 1e-5, warmup 2000 from 0.001, x0.1 at 67% / 89%, clip 1.0
    assert (m["lr"], m["lang_lr"], m["weight_decay"]) == (1e-4, 1e-5, want["weight_decay"])
    assert (m["warmup_steps"], m["warmup_factor"], m["schedule"], m["milestones"]) == (2000, 0.001, "step",
                                                                                         [0.67, 0.89])
    assert m["official_bias_rule"] is True and t["gradient_clip_val"] == 1.0
    assert t["max_steps"] == want["max_steps"] and t["default_root_dir"] == f"runs/{row}"
    args = d["init_args"]
    assert {s["urls"].removeprefix("shards/") for s in args["train"]} == want["gold"]
    if want["pseudo"]:
        assert d["class_path"] == "glip_pl.label.datamodule.TeacherStudentDataModule"
        assert [s["urls"] for s in args["pseudo"]] == [f"shards/{want['pseudo']}"]
    else:
        assert d["class_path"] == "glip_pl.lit.datamodule.GroundingDataModule"
    assert [v["urls"] for v in args["val"]] == ["shards/coco"] and args["batch_size"] == want["batch"]
    assert (args["val_size"], args["val_max_size"]) == (800, 1333)
    ema = [c for c in t["callbacks"] if c["class_path"] == "glip_pl.lit.callbacks.EMA"]
    assert (ema[0]["init_args"]["decay"] if ema else None) == (0.999 if want["ema"] else None)
    head = path.read_text().split("\n__base__", 1)[0]
    assert f"Paper zero-shot COCO val2017 box AP: {want['ap']}." in head
    # a delta: only what differs, well under the ~95 lines each row had when it was a copy
    body = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(body) <= 40, (row, len(body))


# ----------------------------------------------------------------------------------------- bad bases
def _parse_error(tmp_path, capsys, recipe: Path):
    from glip_pl.lit.cli import run

    with pytest.raises(SystemExit):
        run(["fit", "--config", str(recipe), "--print_config"])
    return capsys.readouterr().err


def test_missing_base_names_the_recipe(tmp_path, capsys):
    r = tmp_path / "row.yaml"
    r.write_text("__base__: nowhere/base.yaml\nmodel:\n  preset: tiny\n")
    err = _parse_error(tmp_path, capsys, r)
    assert str(r) in err and "__base__" in err and "nowhere/base.yaml" in err and "cannot be read" in err


def test_base_cycle_is_an_error(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("__base__: b.yaml\n")
    (tmp_path / "b.yaml").write_text("__base__: a.yaml\nmodel:\n  preset: tiny\n")
    err = _parse_error(tmp_path, capsys, tmp_path / "a.yaml")
    assert "cycle" in err and "a.yaml -> " in err


def test_base_that_is_not_a_mapping(tmp_path, capsys):
    (tmp_path / "b.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "a.yaml").write_text("__base__: b.yaml\n")
    err = _parse_error(tmp_path, capsys, tmp_path / "a.yaml")
    assert "b.yaml" in err and "mapping" in err


def test_inline_base_is_refused(capsys):
    from glip_pl.lit.cli import run

    with pytest.raises(SystemExit):
        run(["fit", "--config", "{__base__: recipes/base/pretrain.yaml}", "--print_config"])
    assert "recipe file only" in capsys.readouterr().err


def test_base_merge_rules(tmp_path):
    """Mappings merge at every depth (model_options too), lists replace, ``+`` appends, plain data keys become the
    init_args of a data class named over them, and a base's own base comes first."""
    from glip_pl.lit.recipes import load_recipe

    (tmp_path / "root.yaml").write_text("model:\n  lr: 1.0\n  lang_lr: 2.0\n")
    (tmp_path / "b.yaml").write_text(
        "__base__: root.yaml\nmodel:\n  lr: 3.0\n  model_options: {a: 1, b: {c: 2}}\n"
        "trainer:\n  callbacks: [{class_path: X}]\n  plugins: [p]\n"
        "data:\n  batch_size: 2\n  val: [{urls: v}]\n")
    (tmp_path / "d.yaml").write_text(
        "__base__: b.yaml\nmodel:\n  model_options: {b: {d: 3}}\n"
        "trainer:\n  callbacks+: [{class_path: Y}]\n  plugins: [q]\n"
        "data:\n  class_path: TS\n  init_args:\n    pseudo: [{urls: p}]\n")
    assert load_recipe(tmp_path / "d.yaml") == {
        "model": {"lr": 3.0, "lang_lr": 2.0, "model_options": {"a": 1, "b": {"c": 2, "d": 3}}},
        "trainer": {"callbacks": [{"class_path": "X"}, {"class_path": "Y"}], "plugins": ["q"]},
        "data": {"class_path": "TS", "init_args": {"batch_size": 2, "val": [{"urls": "v"}], "pseudo": [{"urls": "p"}]}}}


def test_a_base_cannot_name_a_class_outside_the_allow_list(tmp_path, monkeypatch):
    """The recipe on the command line is clean; its base names a foreign class: refused, never imported."""
    from glip_pl.lit.cli import run

    marker = tmp_path / "imported"
    (tmp_path / "evilbase.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Evil: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "base.yaml").write_text("trainer:\n  callbacks:\n    - class_path: evilbase.Evil\n")
    (tmp_path / "row.yaml").write_text("__base__: base.yaml\nmodel:\n  preset: tiny\n")
    with pytest.raises(SystemExit, match=r"(?s)refusing.*trainer.callbacks.*evilbase.Evil"):
        run(["fit", "--config", str(tmp_path / "row.yaml"), "--print_config"])
    assert not marker.exists(), "the module was imported"


if __name__ == "__main__":  # the snapshot (see the module docstring)
    configs = {name: composed(stack, derive=False) for name, stack in STACKS.items()}
    Path(sys.argv[1]).write_text(json.dumps({
        "generated": "tests/lit/test_recipe_composition.py run as a script on main's code and recipes "
                     "(git archive main at commit 340fdc0); see its docstring",
        "configs": configs}, indent=1, sort_keys=True) + "\n")
