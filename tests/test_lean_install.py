"""The core install (no extras): predict, evaluate, official import/export and weights by name work without the
training, labelling and DeepSpeed libraries, and a command that needs an extra says which, in one line.

A ``sitecustomize`` on PYTHONPATH makes the extras' packages unimportable in fresh processes, as if they were not
installed; everything else comes from this environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

# What `pip install glip_pl` (no extras) leaves out; see pyproject.toml.
EXTRA_PACKAGES = ("lightning", "lightning_fabric", "pytorch_lightning", "webdataset", "wandb", "jsonargparse",
                  "spacy", "deepspeed", "torchmetrics")

SITECUSTOMIZE = f"""
import sys

_BLOCKED = {EXTRA_PACKAGES!r}


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (lean-install test)", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
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
from glip_pl.official import FORMAT, FORMAT_VERSION

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
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    src = str(Path(__file__).resolve().parents[1] / "src")
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
    rec = json.loads((work / "pred" / "cat.json").read_text())
    assert (rec["height"], rec["width"]) == (50, 80) and rec["detections"]
    assert (work / "pred" / "cat.png").is_file()
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
