"""The Slurm launchers on a compute node, without Slurm: a fake ``srun`` records what would run. They source the
site hook (``GLIP_PL_SETUP``), activate the environment and install nothing; their logs go where Slurm can open
them before the script runs (the real sbatch → preempt → requeue run is ``test_slurm.py``)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["scripts/slurm/pretrain.sh", "scripts/slurm/pseudo_label.sh"]


@pytest.fixture
def node(tmp_path):
    """A fake compute node: srun and pip that record their calls, a site hook, the Slurm variables of a job."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("srun", "pip", "pip3"):
        (fake / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/calls"\n')
        (fake / tool).chmod(0o755)
    hook = tmp_path / "site.sh"
    hook.write_text(f'echo "module load cuda" >> "{tmp_path}/calls"\nexport PATH="{fake}:$PATH"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="4",
               SLURM_JOB_NODELIST="n1", MASTER_ADDR="n1", GLIP_PL_SETUP=str(hook), GLIP_PL_VENV=sys.prefix,
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    return tmp_path, env


@pytest.mark.parametrize("script", SCRIPTS)
def test_launcher_sources_the_site_hook_and_installs_nothing(node, script):
    tmp_path, env = node
    r = subprocess.run(["bash", str(REPO / script), "recipes/local/cpu_smoke.yaml", "--x=1"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "module load cuda"  # the hook ran first
    assert not [c for c in calls if c.startswith("pip")], calls
    (run,) = [c for c in calls if c.startswith("srun ")]
    sub = "fit" if "pretrain" in script else "pseudo-label"
    assert f"-m glip_pl.cli {sub} --config recipes/local/cpu_smoke.yaml " in run and " --x=1" in run
    assert ("--trainer.num_nodes=2 --trainer.devices=4" if sub == "fit" else "--num-nodes 2 --devices 4") in run


def test_a_missing_site_hook_is_a_clear_error(node):
    tmp_path, env = node
    env["GLIP_PL_SETUP"] = str(tmp_path / "nope.sh")
    r = subprocess.run(["bash", str(REPO / SCRIPTS[1]), "recipes/local/cpu_smoke.yaml"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "GLIP_PL_SETUP" in r.stderr and "nope.sh: no such file" in r.stderr
    assert not (tmp_path / "calls").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_slurm_log_is_not_in_a_folder_the_script_creates(script):
    """Slurm opens --output before the script runs: a folder in it must already exist in a fresh checkout."""
    outputs = re.findall(r"^#SBATCH --output=(\S+)$", (REPO / script).read_text(), re.M)
    assert len(outputs) == 1
    parent = Path(outputs[0]).parent
    assert parent == Path(".") or (REPO / parent).is_dir() and subprocess.run(
        ["git", "ls-files", "--error-unmatch", str(parent)], cwd=REPO, capture_output=True).returncode == 0
