"""The first GPU hour, prepared: one command (no network, <= 9 minutes on one H100) that measures what the CPU
sessions could only estimate, and writes one json + one markdown table under benchmarks/results/.

Parts, in priority order (each in its own process with a time cap; a part that fails or runs out of time is recorded
with its error and the suite goes on; the whole run stops starting parts when its budget is spent):
  env                 device, peak bf16 FLOP/s, versions
  train:<preset>:<v>  one training step of glip_t (batch 2) and glip_l (batch 1) at 800x1333 in bf16 autocast
                      (benchmarks/bench_model.py's step): v = official (text padded to 256, plain attention, per-image
                      ATSS + loss loop, torchvision deform conv) / glip_pl (the fast path) / compile (+ torch.compile of
                      the head); images/s, peak memory (torch.cuda.max_memory_allocated), MFU = counted FLOPs per image
                      (benchmarks/count_flops.py, the longest-prompt model: the work a step needs) x images/s / peak
  flops:<preset>      that FLOP count (CPU, fake tensors; runs beside the GPU parts)
  memplan             benchmarks/memory_plan.py's prediction of the glip_pl step's peak (bf16 and fp32 traces, CPU,
                      beside the GPU parts) against the measured one
  fit                 a 50-step `glip-pl fit` of glip_t on synthetic 800-px shards (`glip-pl shards synthetic`),
                      images/s and the data-wait fraction (benchmarks/bench_train.py's windows, first one dropped)
  infer / lvis        single-prompt and LVIS-chunked inference images/s (bench_inference.py, bench_lvis_chunks.py)
  label               pseudo-labelling images/s with a glip_t teacher (bench_label.py)

    python benchmarks/gpu_suite.py                   # on the GPU machine (bf16, 800x1333)
    python benchmarks/gpu_suite.py --smoke           # CPU, tiny preset, tiny sizes: what the test suite runs
    python benchmarks/gpu_suite.py --parts env train:glip_t:glip_pl memplan

Writes benchmarks/results/gpu_suite-<time>.json and .md and prints the markdown (ready for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from bench_common import git_commit  # noqa: E402

OFFICIAL = dict(pad256=True, use_sdpa=False, loss_loop=True, deform_conv="torchvision")
TRAIN_VARIANTS = {"official": OFFICIAL, "glip_pl": {}, "compile": dict(compile=True)}

FULL = dict(device="cuda", accelerator="gpu", dtype="bf16", precision="bf16-mixed", size=(800, 1333), prompt_tokens=40,
            batch={"glip_t": 2, "glip_l": 1}, steps=5, warmup=2, budget_s=500, threads=0, cpu_threads=4,
            fit=dict(preset="glip_t", image_size=800, train=128, min_sizes=[800], max_size=1333, batch=2, steps=50,
                     every=10, workers=6),
            infer=dict(preset="glip_t", images=16, height=800, width=1333, batch=[1, 8]),
            lvis=dict(preset="glip_t", images=1, height=800, width=1333, chunk_batch=[1, 4]),
            label=dict(preset="glip_t", images=32, min_size=800, max_size=1333, batch=8))
SMOKE = dict(device="cpu", accelerator="cpu", dtype="fp32", precision="32-true", size=(96, 128), prompt_tokens=16,
             batch={"tiny": 1}, steps=1, warmup=1, budget_s=2400, threads=1, cpu_threads=1,
             fit=dict(preset="tiny", image_size=128, train=16, min_sizes=[96], max_size=128, batch=2, steps=6,
                      every=2, workers=0),
             infer=dict(preset="tiny", images=1, height=96, width=128, batch=[1]),
             lvis=dict(preset="tiny", images=1, height=96, width=128, chunk_batch=[1]),
             label=dict(preset="tiny", images=4, min_size=96, max_size=128, batch=2))
# caps in seconds for the GPU run; the smoke run allows SMOKE_CAP for every part (its parts take seconds on an idle
# CPU, but minutes on a 2-core machine shared by a dozen jobs, where a cap would only make the test flaky)
SMOKE_CAP = 600
CAPS = {"env": 60, "train": 120, "compile": 170, "flops": 240, "memplan": 300, "fit": 170, "infer": 90, "lvis": 90,
        "label": 90}


# ----------------------------------------------------------------------------------------------------- children
def part_env(cfg, args) -> dict:
    import torch

    from bench_model import device_peak_tflops

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cpus": os.cpu_count(), "host": platform.node(), "commit": git_commit()}
    for dist in ("torchvision", "lightning", "timm", "transformers", "webdataset", "deepspeed"):
        try:  # the installed distribution's version, without importing it (deepspeed's import alone takes ~10 s)
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    if cfg["device"] == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, memory_gib=p.total_memory / 2**30, cudnn=torch.backends.cudnn.version(),
                   capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
    else:
        out["device"] = "cpu"
    out["peak_tflops"] = args.peak_tflops or device_peak_tflops(cfg["device"], "bf16")
    return out


def part_train(cfg, args, preset: str, variant: str) -> dict:
    import torch

    import bench_model

    if args.smoke and variant == "compile":
        # inductor takes minutes on CPU; the smoke run checks the path with TorchDynamo's eager backend
        orig = torch.compile
        torch.compile = lambda *a, **k: orig(*a, **{**k, "backend": "eager"})
    ns = argparse.Namespace(**{**bench_model.DEFAULTS, **TRAIN_VARIANTS[variant]})
    ns.preset, ns.device, ns.dtype = preset, cfg["device"], cfg["dtype"]
    ns.h, ns.w = cfg["size"]
    ns.batch, ns.prompt_tokens = cfg["batch"][preset], cfg["prompt_tokens"]
    ns.steps, ns.warmup, ns.threads, ns.no_flops = cfg["steps"], cfg["warmup"], cfg["threads"], True
    r = bench_model.run_variant(ns)
    r.pop("flops", None)
    r["variant"] = variant
    return r


def part_flops(cfg, args, preset: str) -> dict:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    import count_flops
    from glip_pl.model import build_glip

    torch.set_num_threads(cfg["cpu_threads"])
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    model = build_glip(preset, use_sdpa=False, dropblock=False).train()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model.backbone._apply(mode.from_tensor)
    model.head._apply(mode.from_tensor)
    h, w = cfg["size"]
    r = count_flops.count(model, mode, h, w, 1, cfg["prompt_tokens"], pad256=False)
    return {"flops_per_image": r["total"], "text_len": r["text_len"], "parts": r}


def part_memplan(cfg, args) -> dict:
    import torch

    import memory_plan

    torch.set_num_threads(cfg["cpu_threads"])
    preset = next(iter(cfg["batch"]))
    h, w = cfg["size"]
    state = memory_plan.model_state(preset)
    out = {"preset": preset, "batch": cfg["batch"][preset], "h": h, "w": w}
    for dtype in ("bf16", "fp32"):
        t = memory_plan.trace_step(preset, h, w, cfg["batch"][preset], cfg["prompt_tokens"], "none", dtype)
        out[f"predicted_gib_{dtype}"] = memory_plan.predict(t, state)["1 GPU"] / 2**30
        out[f"trace_s_{dtype}"] = t["trace_s"]
    return out


def part_fit(cfg, args) -> dict:
    import yaml

    import bench_train

    f = cfg["fit"]
    tmp = Path(tempfile.mkdtemp(prefix="gpu_suite_fit_"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "glip_pl.cli", "shards", "synthetic", "--out", str(tmp / "shards"),
                    "--train", str(f["train"]), "--val", "8", "--image-size", str(f["image_size"]),
                    "--workers", str(max(1, min(8, os.cpu_count() or 1))), "--no-progress"],
                   check=True, capture_output=True, text=True, env=env)
    shards_s = time.perf_counter() - t0
    path = bench_train.make_recipe(REPO / "recipes/local/cpu_smoke.yaml", tmp, str(tmp / "shards"), f["workers"],
                                   f["steps"], f["every"])
    rec = yaml.safe_load(path.read_text())
    rec["model"]["preset"] = f["preset"]
    rec["trainer"].update(accelerator=cfg["accelerator"], precision=cfg["precision"])
    rec["data"].update(batch_size=f["batch"], train_min_sizes=f["min_sizes"], train_max_size=f["max_size"])
    path.write_text(yaml.safe_dump(rec, sort_keys=False))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "glip_pl.cli", "fit", "--config", str(path)], capture_output=True,
                       text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError("glip-pl fit failed: " + (r.stderr.strip().splitlines() or ["?"])[-1])
    win = bench_train.read_windows(tmp / f"workers{f['workers']}")[1:]
    if not win:
        raise RuntimeError("glip-pl fit logged no throughput window after the first")
    wait = sum(x["perf/data_wait_s"] for x in win)
    comp = sum(x["perf/compute_s"] for x in win)
    images = sum(x["perf/images_per_s"] * (x["perf/data_wait_s"] + x["perf/compute_s"]) for x in win)
    return {"preset": f["preset"], "steps": f["steps"], "batch": f["batch"], "image_size": f["image_size"],
            "workers": f["workers"], "windows": len(win), "images_per_s": images / (wait + comp),
            "data_wait_fraction": wait / (wait + comp), "fit_wall_s": wall, "shards_s": shards_s}


def _script(name: str, argv: list, threads: int = 0) -> dict:
    out = Path(tempfile.mkdtemp(prefix="gpu_suite_")) / f"{name}.json"
    if threads:  # one thread on a small shared CPU: two threads ran the tiny model ~10x slower there (BENCHMARKS.md)
        argv = [*argv, "--threads", threads]
    r = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *map(str, argv), "--out", str(out)],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    if r.returncode != 0:
        raise RuntimeError(f"{name}.py failed: " + (r.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(out.read_text())


def part_infer(cfg, args) -> dict:
    i = cfg["infer"]
    d = _script("bench_inference", ["--preset", i["preset"], "--device", cfg["device"], "--images", i["images"],
                                    "--height", i["height"], "--width", i["width"], "--batch", *i["batch"],
                                    "--dtype", cfg["dtype"]], cfg["threads"])
    return {"preset": i["preset"], "rows": [{k: r[k] for k in ("batch", "dtype", "images_per_s")} for r in d["rows"]]}


def part_lvis(cfg, args) -> dict:
    i = cfg["lvis"]
    d = _script("bench_lvis_chunks", ["--preset", i["preset"], "--device", cfg["device"], "--images", i["images"],
                                      "--height", i["height"], "--width", i["width"], "--chunk-batch", *i["chunk_batch"]],
                cfg["threads"])
    return {"preset": i["preset"], "rows": [{"protocol": r["protocol"], "chunks": r["chunks"],
                                             "chunk_batch": r["chunk_batch"], "images_per_s": 1 / r["s_per_image"]}
                                            for r in d["rows"]]}


def part_label(cfg, args) -> dict:
    i = cfg["label"]
    d = _script("bench_label", ["--preset", i["preset"], "--accelerator", cfg["accelerator"], "--captions", 0,
                                "--images", i["images"], "--min-size", i["min_size"], "--max-size", i["max_size"],
                                "--batch", i["batch"]], cfg["threads"] or 4)
    r = d["label"][0]
    return {"preset": i["preset"], "images": r["images"], "images_per_s": r["images_per_s"]}


def run_child(name: str, cfg: dict, args) -> dict:
    kind, *rest = name.split(":")
    fn = {"env": part_env, "train": part_train, "flops": part_flops, "memplan": part_memplan, "fit": part_fit,
          "infer": part_infer, "lvis": part_lvis, "label": part_label}[kind]
    return fn(cfg, args, *rest)


# ------------------------------------------------------------------------------------------------------- parent
def plan_parts(cfg: dict) -> tuple:
    """(GPU parts in priority order, CPU-only parts run beside them)."""
    presets = list(cfg["batch"])
    gpu = ["env"]
    for p in presets[:1]:
        gpu += [f"train:{p}:glip_pl", f"train:{p}:official", f"train:{p}:compile"]
    for p in presets[1:]:
        gpu += [f"train:{p}:glip_pl", f"train:{p}:official"]
    gpu += ["fit", "infer", "lvis", "label"] + [f"train:{p}:compile" for p in presets[1:]]
    cpu = [f"flops:{p}" for p in presets] + ["memplan"]
    return gpu, cpu


def cap_of(name: str, smoke: bool = False) -> int:
    if smoke:
        return SMOKE_CAP
    kind = name.split(":")[0]
    return CAPS["compile"] if name.endswith(":compile") else CAPS[kind]


def child_cmd(name: str, args) -> list:
    cmd = [sys.executable, __file__, "--child", name]
    if args.smoke:
        cmd.append("--smoke")
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    return cmd


def collect(name: str, proc: subprocess.Popen, t0: float, cap: float) -> dict:
    try:
        out, err = proc.communicate(timeout=max(1.0, cap - (time.perf_counter() - t0)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"ok": False, "seconds": time.perf_counter() - t0, "error": f"time cap {cap:.0f} s reached"}
    dt = time.perf_counter() - t0
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (err.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "seconds": dt, "error": tail, "stderr_tail": err[-2000:]}
    return {"ok": True, "seconds": dt, "result": json.loads(lines[-1])}


def derive(res: dict, cfg: dict) -> None:
    """MFU of every training row and the memory plan's prediction against the measured peak."""
    peak = (res.get("env", {}).get("result") or {}).get("peak_tflops")
    for name, p in res.items():
        if not (name.startswith("train:") and p["ok"]):
            continue
        preset = name.split(":")[1]
        fl = res.get(f"flops:{preset}", {}).get("result")
        r = p["result"]
        r["flops_per_image"] = fl["flops_per_image"] if fl else None
        r["tflops_per_s"] = fl["flops_per_image"] * r["images_per_s"] / 1e12 if fl else None
        r["mfu"] = r["tflops_per_s"] / peak if (fl and peak) else None
    mp, meas = res.get("memplan", {}), res.get(f"train:{next(iter(cfg['batch']))}:glip_pl", {})
    if mp.get("ok") and meas.get("ok"):
        m = mp["result"]
        m["measured_gib"] = meas["result"]["peak_mib"] / 1024
        m["measured_over_bf16_prediction"] = m["measured_gib"] / m["predicted_gib_bf16"]


def fmt(x, spec=".2f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(res: dict, cfg: dict, meta: dict) -> str:
    env = res.get("env", {}).get("result") or {}
    h, w = cfg["size"]
    lines = [f"### GPU suite — {env.get('device', '?')}, commit {meta['commit']}, {meta['started']}",
             "", f"`{meta['command']}` — torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
             f"peak bf16 {fmt(env.get('peak_tflops'), '.0f')} TFLOP/s, {meta['wall_s']:.0f} s in all", "",
             f"Training step, {h}×{w}, {cfg['dtype']}, ~{cfg['prompt_tokens']}-token prompt "
             "(MFU: counted FLOPs of the longest-prompt model per image × images/s ÷ peak)", "",
             "| preset | variant | batch | text T | step s | images/s | peak GiB | MFU | speed-up |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for preset in cfg["batch"]:
        base = res.get(f"train:{preset}:official", {}).get("result")
        for v in TRAIN_VARIANTS:
            p = res.get(f"train:{preset}:{v}")
            if p is None:
                continue
            if not p["ok"]:
                lines.append(f"| {preset} | {v} | | | | | | | {p['error'][:80]} |")
                continue
            r = p["result"]
            sp = base["step_s"] / r["step_s"] if base else None
            lines.append(f"| {preset} | {v} | {cfg['batch'][preset]} | {r['text_len']} | {r['step_s']:.3f} | "
                         f"{r['images_per_s']:.2f} | {r['peak_mib'] / 1024:.1f} | "
                         f"{fmt(r.get('mfu') and 100 * r['mfu'], '.1f')}% | {fmt(sp)}× |")
    rows = []
    mp = res.get("memplan", {})
    if mp.get("ok"):
        m = mp["result"]
        rows.append(f"| memory plan, {m['preset']} batch {m['batch']} | predicted {m['predicted_gib_bf16']:.1f} GiB "
                    f"(bf16 trace) – {m['predicted_gib_fp32']:.1f} GiB (fp32 trace); measured "
                    f"{fmt(m.get('measured_gib'), '.1f')} GiB |")
    f = res.get("fit", {})
    if f.get("ok"):
        r = f["result"]
        rows.append(f"| `glip-pl fit`, {r['preset']}, {r['steps']} steps, batch {r['batch']}, {r['image_size']}-px "
                    f"shards, {r['workers']} workers | {r['images_per_s']:.2f} images/s, data wait "
                    f"{100 * r['data_wait_fraction']:.1f} % |")
    i = res.get("infer", {})
    if i.get("ok"):
        for r in i["result"]["rows"]:
            rows.append(f"| inference, one prompt (80 names), {i['result']['preset']}, batch {r['batch']}, "
                        f"{r['dtype']} | {r['images_per_s']:.2f} images/s |")
    lv = res.get("lvis", {})
    if lv.get("ok"):
        for r in lv["result"]["rows"]:
            rows.append(f"| LVIS chunks, {lv['result']['preset']}, {r['protocol']} ({r['chunks']} chunks, "
                        f"{r['chunk_batch']}/call) | {r['images_per_s']:.3f} images/s |")
    lb = res.get("label", {})
    if lb.get("ok"):
        rows.append(f"| pseudo-labelling, {lb['result']['preset']} teacher | {lb['result']['images_per_s']:.2f} "
                    "images/s |")
    for name, p in res.items():
        if not p["ok"] and not name.startswith("train:"):
            rows.append(f"| {name} | failed: {p['error'][:100]} |")
    lines += ["", "| part | figure |", "|---|---|"] + rows
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, tiny sizes (the test suite's run)")
    ap.add_argument("--parts", nargs="+", default=None, help="run only these parts (names as in the docstring)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting parts after this (default 500 s on GPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (known for A100/H100/H200)")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks/results"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    if args.child:
        print(json.dumps(run_child(args.child, cfg, args)))
        return 0

    budget = args.budget_s or cfg["budget_s"]
    gpu, cpu = plan_parts(cfg)
    if args.parts:
        gpu = [p for p in gpu if p in args.parts]
        cpu = [p for p in cpu if p in args.parts]
    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}

    def start(name):
        return subprocess.Popen(child_cmd(name, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=REPO)

    # CPU-only parts run beside the GPU ones (the GPU machine has cores to spare)
    background = {n: (start(n), time.perf_counter(), min(cap_of(n, args.smoke), budget)) for n in cpu}
    res = {}
    for name in gpu:
        left = budget - (time.perf_counter() - t_start)
        if left < 20:
            res[name] = {"ok": False, "seconds": 0.0, "error": f"not started: suite budget {budget:.0f} s spent"}
            continue
        cap = min(cap_of(name, args.smoke), left)
        res[name] = collect(name, start(name), time.perf_counter(), cap)
        print(f"  {name}: {'ok' if res[name]['ok'] else res[name]['error']} ({res[name]['seconds']:.0f} s)",
              file=sys.stderr, flush=True)
    for name, (proc, t0, cap) in background.items():
        res[name] = collect(name, proc, t0, min(cap, budget + 20))  # caps count from the suite's start
        print(f"  {name}: {'ok' if res[name]['ok'] else res[name]['error']} ({res[name]['seconds']:.0f} s)",
              file=sys.stderr, flush=True)
    derive(res, cfg)
    meta = {"command": "python benchmarks/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": git_commit(), "started": started, "smoke": args.smoke, "budget_s": budget,
            "wall_s": time.perf_counter() - t_start, "config": cfg}
    md = markdown(res, cfg, meta)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_suite-{'smoke-' if args.smoke else ''}{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    (out / f"{stem}.json").write_text(json.dumps({**meta, "parts": res}, indent=2, default=str))
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out / stem}.json and .md — paste the table into BENCHMARKS.md under a 'GPU suite' heading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
