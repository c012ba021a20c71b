"""The core install (no extras): predict, evaluate, official import/export and weights by name work without the
training, labelling and DeepSpeed libraries, and a command that needs an extra says which, in one line.

A ``sitecustomize`` on PYTHONPATH hides, in fresh processes, every installed package that the core dependencies of
pyproject.toml do not bring (and always the extras' packages), as if it were not installed: ``import`` raises
ModuleNotFoundError and ``importlib.util.find_spec`` returns None.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# What `pip install glip_pl` (no extras) must leave out; see pyproject.toml.
EXTRA_PACKAGES = ("lightning", "lightning_fabric", "pytorch_lightning", "webdataset", "wandb", "jsonargparse",
                  "spacy", "deepspeed", "torchmetrics")


def core_distributions() -> set:
    """The distributions `pip install glip_pl` installs: pyproject's dependencies and theirs, transitively (as
    installed here; a requirement that is not installed is skipped)."""
    todo = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    seen = set()
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in map(Requirement, requires):
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(r)
    return {name for name, _ in seen}


def hidden_modules() -> list:
    """Top-level modules of installed distributions outside the core install, and the extras' packages."""
    core = core_distributions() | {"glip-pl"}
    hidden = {top for top, dists in metadata.packages_distributions().items()
              if not any(canonicalize_name(d) in core for d in dists)}
    return sorted((hidden | set(EXTRA_PACKAGES)) - {"glip_pl"})


SITECUSTOMIZE = """
import sys
from importlib.machinery import PathFinder

_HIDDEN = frozenset({hidden!r})


class _CoreOnly(PathFinder):
    # stands in for PathFinder, so that a hidden package is simply not found (find_spec -> None), as if absent
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in _HIDDEN:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [_CoreOnly if f is PathFinder else f for f in sys.meta_path]
"""

# Runs in the lean process: the core commands in-process through the dispatcher, then checks that none of the
# extras' packages got imported on the way.
DRIVER = """
import contextlib, io, json, sys
from dataclasses import asdict
from pathlib import Path

import torch

work = Path(sys.argv[1])
try:
    import lightning  # noqa: F401
    raise SystemExit("the import blocker is not active")
except ImportError:
    pass

from glip_pl.cli import main
from glip_pl.model import build_glip
from glip_pl.checkpoints import FORMAT, FORMAT_VERSION

torch.manual_seed(0)
model = build_glip("tiny").eval()
ckpt = work / "tiny.pt"
torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "preset": "tiny", "config": asdict(model.cfg),
            "state_dict": model.state_dict()}, ckpt)

results = {}
results["predict"] = main(["predict", "--ckpt", str(ckpt), "--image", str(work / "cat.png"), "--prompt",
                           "a cat. a remote control", "--out", str(work / "pred"), "--threshold", "0",
                           "--score-thresh", "0", "--min-size", "64", "--max-size", "96"])
results["evaluate"] = main(["evaluate", "coco", "-a", str(work / "gt.json"), "-d", str(work / "dt.json"),
                            "-o", str(work / "metrics.json")])
results["export"] = main(["export-official", str(ckpt), str(work / "official.pth")])
for cmd in ("import-official", "export-official"):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main([cmd, "--help"])
        except SystemExit as e:
            results[cmd + " --help"] = e.code
    results[cmd + " help text"] = buf.getvalue()

from glip_pl.hub import resolve_official
from glip_pl.model.types import GLIPInputError

try:  # an empty offline cache: the by-name route reaches huggingface_hub and says what to download
    resolve_official("glip_t")
    results["hub"] = "resolved"
except GLIPInputError as e:
    results["hub"] = str(e)

results["imported"] = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
print(json.dumps(results))
"""

GT = {
    "images": [{"id": 1, "width": 200, "height": 200}],
    "categories": [{"id": 1, "name": "cat"}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500,
                     "iscrowd": 0}],
}
DT = [{"image_id": 1, "category_id": 1, "bbox": [12, 11, 48, 50], "score": 0.9}]


def _lean_env(tmp_path: Path) -> dict:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(hidden=hidden_modules()))
    src = str(ROOT / "src")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), src] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
               GLIP_PL_CACHE=str(tmp_path / "glip_pl_cache"), OMP_NUM_THREADS="1")
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return env


def test_core_commands_without_extras(tmp_path):
    env = _lean_env(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    Image.new("RGB", (80, 50), (120, 60, 30)).save(work / "cat.png")
    (work / "gt.json").write_text(json.dumps(GT))
    (work / "dt.json").write_text(json.dumps(DT))
    driver = f"BLOCKED = {EXTRA_PACKAGES!r}\n" + DRIVER
    r = subprocess.run([sys.executable, "-c", driver, str(work)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["imported"] == [], f"extras' packages imported by the core commands: {res['imported']}"
    assert res["predict"] == 0, r.stderr[-3000:]
    rec = json.loads((work / "pred" / "cat.png.json").read_text())
    assert (rec["height"], rec["width"]) == (50, 80) and rec["detections"]
    assert (work / "pred" / "cat.png.png").is_file()
    assert res["evaluate"] == 0
    assert 0 < json.loads((work / "metrics.json").read_text())["AP"] <= 1
    assert res["export"] == 0 and (work / "official.pth").is_file()
    assert res["import-official --help"] == 0 and "--preset" in res["import-official help text"]
    assert res["export-official --help"] == 0
    assert "glip_t" in res["hub"] and "HF_HUB_OFFLINE" in res["hub"], res["hub"]


def test_extra_commands_name_their_extra(tmp_path):
    """`glip-pl fit` without the training extra (and `pseudo-label` without the labelling one): exit status 2 and
    one line naming the extra to install, no traceback."""
    env = _lean_env(tmp_path)
    for cmd, extra in ((["fit", "--config", "recipe.yaml"], "the training extra: pip install 'glip_pl[train]'"),
                       (["pseudo-label", "--config", "label.yaml"],
                        "the labelling extra: pip install 'glip_pl[label]'")):
        r = subprocess.run([sys.executable, "-m", "glip_pl.cli", *cmd], env=env, capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
        assert (r.returncode, r.stdout) == (2, ""), r.stderr
        assert r.stderr == f"glip-pl {cmd[0]} needs {extra}\n"


def test_core_dependencies_leave_the_extras_out():
    """pyproject's core dependencies bring none of the extras' packages, and [all] is train + label + deepspeed."""
    extras_dists = {canonicalize_name(d) for top in EXTRA_PACKAGES for d in metadata.packages_distributions().get(top, [top])}
    assert not core_distributions() & extras_dists
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"train", "label", "deepspeed", "all", "dev"} <= set(optional)
    assert [Requirement(r).extras for r in optional["all"]] == [{"train", "label", "deepspeed"}]
