"""benchmarks/gpu_suite.py must not rot before a GPU is lent: its --smoke run (CPU, tiny preset, tiny sizes) goes
through every part of the GPU run and must produce numbers for each; a failing or overrunning part is recorded and
the suite goes on."""

import json
import os
import subprocess
import sys
import time

import pytest

from _load import BENCHMARKS, load

SECTIONS = ["env", "train:tiny:official", "train:tiny:glip_pl", "train:tiny:compile", "flops:tiny", "memplan", "fit",
            "infer", "lvis", "label"]


def test_a_failing_or_overrunning_part_is_recorded():
    suite = load("gpu_suite")
    t0 = time.perf_counter()
    bad = suite.collect("x", subprocess.Popen([sys.executable, "-c", "import sys; sys.exit('boom at x')"],
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), t0, 60)
    assert not bad["ok"] and "boom at x" in bad["error"]
    t0 = time.perf_counter()
    slow = suite.collect("y", subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), t0, 2)
    assert not slow["ok"] and "time cap" in slow["error"] and slow["seconds"] < 30


@pytest.mark.slow
def test_smoke_run_has_every_section_with_numbers(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    r = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--smoke", "--peak-tflops", "1",
                        "--out-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=2700)
    assert r.returncode == 0, r.stderr[-3000:]
    (js,) = tmp_path.glob("gpu_suite-smoke-*.json")
    (md,) = tmp_path.glob("gpu_suite-smoke-*.md")
    parts = json.loads(js.read_text())["parts"]
    for name in SECTIONS:
        assert parts[name]["ok"], (name, parts[name].get("error"), parts[name].get("stderr_tail"))
    assert parts["env"]["result"]["torch"] and parts["env"]["result"]["peak_tflops"] == 1
    for v in ("official", "glip_pl", "compile"):
        t = parts[f"train:tiny:{v}"]["result"]
        assert t["images_per_s"] > 0 and t["peak_mib"] > 0 and t["flops_per_image"] > 0 and t["mfu"] > 0, t
    assert parts["train:tiny:official"]["result"]["text_len"] == 256  # the official variant pads the text
    m = parts["memplan"]["result"]
    assert m["predicted_gib_bf16"] > 0 and m["predicted_gib_fp32"] > 0 and m["measured_gib"] > 0
    f = parts["fit"]["result"]
    assert f["images_per_s"] > 0 and 0 <= f["data_wait_fraction"] <= 1 and f["windows"] >= 1
    assert all(x["images_per_s"] > 0 for x in parts["infer"]["result"]["rows"])
    assert all(x["images_per_s"] > 0 for x in parts["lvis"]["result"]["rows"])
    assert parts["label"]["result"]["images_per_s"] > 0
    text = md.read_text()
    assert "| tiny | glip_pl |" in text and "data wait" in text and "memory plan" in text and "failed" not in text
