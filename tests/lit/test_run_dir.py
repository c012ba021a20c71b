"""One setting moves a run: ``glip-pl fit --trainer.default_root_dir X`` puts every output under X (checkpoints, the
W&B files and ``wandb_run_id``, ``config.yaml``), nothing under the recipe's own run path and nothing in the cwd; a
path a recipe or flag sets explicitly is kept."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _files(d: Path) -> set:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


def test_one_override_moves_every_output(synthetic_shards, tmp_path):
    cwd, run = tmp_path / "cwd", tmp_path / "elsewhere" / "my_run"
    cwd.mkdir()
    args = ["fit", "--config", str(ROOT / "recipes/local/cpu_smoke.yaml"), "--trainer.default_root_dir", str(run),
            "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
            f'--data.train=[{{"urls": "{synthetic_shards}/detection"}}]',
            f'--data.val=[{{"urls": "{synthetic_shards}/detection", "split": "val"}}]',
            "--data.batch_size=2", "--data.num_workers=0", "--data.train_min_sizes=[64]", "--data.train_max_size=96",
            "--data.val_size=64", "--data.val_max_size=96"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WANDB_DIR", None)
    r = subprocess.run([sys.executable, "-m", "glip_pl.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]

    assert _files(cwd) == set(), f"written in the cwd: {sorted(_files(cwd))}"
    assert {p.name for p in tmp_path.iterdir()} == {"cwd", "elsewhere"}
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == ["my_run"]
    out = _files(run)
    assert "checkpoints/last.ckpt" in out and "config.yaml" in out and "wandb_run_id" in out, sorted(out)
    assert any(f.startswith("wandb/offline-run-") for f in out), sorted(out)
    assert "glip_pl.lock" not in out  # released at exit

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    t = cfg["trainer"]
    assert t["default_root_dir"] == str(run)
    assert t["logger"]["init_args"]["save_dir"] == str(run) and t["logger"]["init_args"]["name"] == "my_run"
    ck = [c for c in t["callbacks"] if c["class_path"].endswith("AtomicModelCheckpoint")]
    assert ck and ck[0]["init_args"]["dirpath"] == str(run / "checkpoints")


def test_explicit_paths_are_kept_and_unset_ones_derived():
    from glip_pl.lit.cli import GLIPCLI
    from glip_pl.lit.datamodule import GroundingDataModule
    from glip_pl.lit.module import GLIPLitModule
    from glip_pl.lit.run_dir import DEFAULT_RUN_DIR, derive_run_paths

    class ParseOnly(GLIPCLI):
        def instantiate_classes(self) -> None:
            pass

    recipe = str(ROOT / "recipes/local/cpu_smoke.yaml")
    parser = ParseOnly(GLIPLitModule, GroundingDataModule, args=["--config", recipe], run=False).parser

    def derived(*flags):
        cfg = parser.parse_args(["--config", recipe, *flags])
        root = derive_run_paths(cfg)
        t = cfg.trainer
        return root, t.logger.init_args.save_dir, t.logger.init_args.name, t.callbacks[0].init_args.dirpath

    assert derived() == ("runs/cpu_smoke", "runs/cpu_smoke", "cpu_smoke", "runs/cpu_smoke/checkpoints")
    assert derived("--trainer.default_root_dir=a/b", "--trainer.logger.init_args.save_dir=logs",
                   "--trainer.logger.init_args.name=n") == ("a/b", "logs", "n", "a/b/checkpoints")
    assert derived("--trainer.default_root_dir=null") == (DEFAULT_RUN_DIR, DEFAULT_RUN_DIR, "default",
                                                          f"{DEFAULT_RUN_DIR}/checkpoints")
