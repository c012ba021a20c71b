"""Interrupted conversions: an overwrite killed at any point leaves readers the old complete set or a clear error
(never a partial set read as whole) and resumes to the new set; Ctrl-C is one line and exit status 130."""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from glip_pl.data import ShardError, iter_samples
from glip_pl.data.pipeline import SourceSpec, resolve_source
from glip_pl.data.reader import expand_urls
from glip_pl.data.synthetic import SyntheticConfig, generate_synthetic

CFG = SyntheticConfig(image_size=48)
OLD = dict(splits={"train": 40}, seed=0, samples_per_shard=5)  # 8 shards
NEW = dict(splits={"train": 30}, seed=1, samples_per_shard=6)  # 5 shards: the overwrite also removes 3


def _convert(out, spec, overwrite=False):
    generate_synthetic(out, flavours=("detection",), cfg=CFG, num_workers=1, progress=False, overwrite=overwrite,
                       **spec)


def _content(folder):
    """What a reader presents as the split: [(id, boxes)], or the ShardError it raises."""
    try:
        return [(s.id, s.boxes.tolist()) for s in iter_samples(expand_urls(folder, "train"))]
    except ShardError as e:
        return e


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    _convert(str(root / "old"), OLD)
    _convert(str(root / "new"), NEW)
    return str(root / "old"), _content(str(root / "old" / "detection")), _content(str(root / "new" / "detection"))


_MUTATIONS = (("os", "replace"), ("os", "remove"), ("os", "rename"), ("shutil", "rmtree"))


def _overwrite_killed_at(out, kill_at, counter):
    """Child process: the overwrite, SIGKILLed just before its ``kill_at``-th file-system change (never, if 0)."""
    import importlib

    n = [0]
    for mod, name in _MUTATIONS:
        module = importlib.import_module(mod)
        real = getattr(module, name)

        def hooked(*a, _real=real, **k):
            n[0] += 1
            counter.value = n[0]
            if n[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*a, **k)

        setattr(module, name, hooked)
    _convert(out, NEW, overwrite=True)


def _run_child(out, kill_at):
    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("i", 0)
    p = ctx.Process(target=_overwrite_killed_at, args=(out, kill_at, counter))
    p.start()
    p.join(60)
    return p.exitcode, counter.value


def test_overwrite_killed_at_every_step_leaves_old_set_or_clear_error(tmp_path, references):
    pristine, old, new = references
    assert isinstance(old, list) and isinstance(new, list) and len(old) == 40 and len(new) == 30
    out = str(tmp_path / "shards")
    shutil.copytree(pristine, out)
    code, steps = _run_child(out, 0)  # an uninterrupted overwrite: how many file-system changes it makes
    assert code == 0 and _content(os.path.join(out, "detection")) == new
    assert steps > 20
    seen = {"old": 0, "error": 0, "new": 0}
    for k in range(1, steps + 1):
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        code, _ = _run_child(out, k)
        assert code == -signal.SIGKILL, k
        got = _content(os.path.join(out, "detection"))
        if isinstance(got, ShardError):
            assert os.path.join(out, "detection") in str(got) and "unfinished" in str(got), (k, str(got))
            seen["error"] += 1
        else:
            assert got in (old, new), f"killed before change {k}: a reader got {len(got)} samples of neither set"
            seen["old" if got == old else "new"] += 1
        _convert(out, NEW, overwrite=True)  # the same command again finishes the job
        assert _content(os.path.join(out, "detection")) == new, k
        assert sorted(n for n in os.listdir(os.path.join(out, "detection")) if n.startswith(".")) == []
    assert seen["old"] and seen["error"], seen  # both outcomes were really reached


def test_index_describing_missing_shards_is_an_error_naming_folder_and_shard(tmp_path, references):
    pristine, _, _ = references
    out = str(tmp_path / "shards")
    shutil.copytree(pristine, out)
    d = os.path.join(out, "detection")
    os.remove(os.path.join(d, "train-000005.tar"))
    with pytest.raises(ShardError, match="train-000005.tar.*missing"):
        expand_urls(d, "train")
    with pytest.raises(ShardError, match="train-000005.tar.*missing"):  # the training pipeline's source
        resolve_source(SourceSpec(d, split="train"))
    with open(os.path.join(d, "train-000002.tar"), "ab") as f:  # a shard of another conversion under a listed name
        f.write(b"\0" * 512)
    with pytest.raises(ShardError, match="train-000002.tar.*bytes"):
        expand_urls(d, "train")
    with pytest.raises(ShardError, match="train-000002.tar.*bytes"):  # named by a pattern: its count is not ours
        resolve_source(SourceSpec(os.path.join(d, "train-{000001..000002}.tar")))
    index = json.load(open(os.path.join(d, "index.json")))  # the index is untrusted too: no paths out of the folder
    index["splits"]["train"]["shards"][0]["name"] = "../elsewhere.tar"
    json.dump(index, open(os.path.join(d, "index.json"), "w"))
    with pytest.raises(ShardError, match=r"shards\[0\].name"):
        expand_urls(d, "train")


def _cli(args, **kw):
    code = "import sys; from glip_pl.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-c", code, "shards", "synthetic", "--no-progress", "--image-size", "64",
                             "--flavours", "detection", "--val", "0", "--samples-per-shard", "2", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def _wait_for_new_shards(folder, n, proc, timeout=60):
    """Until the running conversion has written ``n`` shards (anywhere under ``folder``: staged or in place)."""
    def shards():
        return {(os.path.join(d, f), os.stat(os.path.join(d, f)).st_mtime_ns)
                for d, _, fs in os.walk(folder) for f in fs if f.endswith(".tar")}

    before, t0 = shards(), time.time()  # the copied old set can be younger than a second: compare, not by age
    while time.time() - t0 < timeout:
        if len(shards() - before) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the conversion did not get going")


def _overwrite_under_way(tmp_path, references, workers: int):
    """A copy of the reference set being overwritten by a long conversion that has written 3 new shards."""
    pristine, old, _ = references
    out = str(tmp_path / "shards")
    shutil.copytree(pristine, out)
    proc = _cli(["--out", out, "--train", "3000", "--seed", "1", "--workers", str(workers), "--overwrite"])
    _wait_for_new_shards(out, 3, proc)
    return out, old, proc


def test_ctrl_c_is_one_line_and_exit_130_and_the_old_set_stays(tmp_path, references):
    # two worker processes: Ctrl-C must stop them too, without a traceback from each
    out, old, proc = _overwrite_under_way(tmp_path, references, workers=2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("interrupted:") and out in stderr
    assert _content(os.path.join(out, "detection")) == old


def test_cli_overwrite_sigkilled_mid_conversion_leaves_the_old_set(tmp_path, references):
    out, old, proc = _overwrite_under_way(tmp_path, references, workers=1)
    proc.kill()
    proc.communicate(timeout=60)
    assert _content(os.path.join(out, "detection")) == old
