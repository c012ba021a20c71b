"""The global batch of every cluster setting stacked with the pretraining recipes it is meant for equals the paper
row's batch: nodes x GPUs per node x data.batch_size x trainer.accumulate_grad_batches, read from the config the
real CLI parser builds (the cluster file, then the recipe, then the launch's flags).

Which pairs are meant, and with which launch, is written in each cluster file's header ("Batch arithmetic" lines:
``<recipes>: <launch flags> -> N x G x B x A = 64``); each pretraining recipe's own header states its launch and
its arithmetic too. Both are checked against the parsed config, so a header that disagrees with the YAML fails.
``--nodes=N`` is sbatch's: scripts/slurm/pretrain.sh passes the allocation on as ``--trainer.num_nodes`` and
``--trainer.devices`` (8 tasks per node by default, one per GPU).
"""

import functools
import re
from pathlib import Path

import pytest

from glip_pl.lit.cli import GLIPCLI
from glip_pl.lit.datamodule import GroundingDataModule
from glip_pl.lit.module import GLIPLitModule

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = sorted((ROOT / "recipes" / "cluster").glob("*.yaml"))
PRETRAIN = sorted((ROOT / "recipes" / "pretrain").glob("*.yaml"))
# ../shared/reference/glip_official.md: IMS_PER_BATCH 64 (global) in every official pretraining yaml
# (GLIP-T: 2 nodes x 16 V100 x 2 images; GLIP-L: 4 x 16 x 1)
PAPER_BATCH = {"glip_t_a": 64, "glip_t_b": 64, "glip_t_c": 64, "glip_t": 64, "glip_l": 64}
SBATCH_TASKS_PER_NODE = 8  # scripts/slurm/pretrain.sh: #SBATCH --ntasks-per-node=8 (one task per GPU)

LINE = re.compile(r"^#\s+([\w, ]+):\s+(.*?)\s*->\s*(\d+) x (\d+) x (\d+) x (\d+) = (\d+)\s*$")


class ParseOnly(GLIPCLI):
    def instantiate_classes(self) -> None:
        pass


@functools.lru_cache(maxsize=1)
def _parser():
    """The production parser, built once (building it is most of a parse's time)."""
    cluster, recipe = ROOT / "recipes/cluster/ddp_multi_node.yaml", ROOT / "recipes/pretrain/glip_t_c.yaml"
    return ParseOnly(GLIPLitModule, GroundingDataModule, args=["--config", str(cluster), "--config", str(recipe)],
                     run=False).parser


def global_batch(*configs, flags=()):
    """(nodes, GPUs per node, batch per GPU, accumulation) of the parsed config, launched with ``flags``."""
    args, slurm = [], False
    for f in flags:
        m = re.fullmatch(r"--nodes=(\d+)", f)
        if m:  # sbatch --nodes=N -> pretrain.sh: --trainer.num_nodes=N --trainer.devices=<tasks per node>
            args += [f"--trainer.num_nodes={m[1]}", f"--trainer.devices={SBATCH_TASKS_PER_NODE}"]
            slurm = True
        else:
            args.append(f)
    argv = [a for c in configs for a in ("--config", str(c))] + args
    cfg = _parser().parse_args(argv)
    t = cfg.trainer
    assert slurm or isinstance(t.devices, int), f"devices {t.devices!r}: the arithmetic needs a count"
    return int(t.num_nodes), int(t.devices), int(cfg.data.init_args.batch_size), int(t.accumulate_grad_batches or 1)


def header_lines(cluster: Path) -> list:
    """(recipe stem, launch flags, stated factors, stated product) of each "Batch arithmetic" line of the header."""
    out = []
    for line in cluster.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = LINE.match(line)
        if m:
            for stem in (s.strip() for s in m[1].split(",")):
                out.append((stem, m[2].split(), tuple(int(m[i]) for i in range(3, 7)), int(m[7])))
    return out


CASES = [(c, *line) for c in CLUSTER for line in header_lines(c)]


def test_every_cluster_file_states_its_pretraining_batches():
    assert {c.stem for c in CLUSTER} == {c.stem for c, *_ in CASES}, "a cluster file without batch lines"
    for c in CLUSTER:
        assert {stem for cc, stem, *_ in CASES if cc == c} <= set(PAPER_BATCH), c.name
    # DDP takes every row; FSDP2 only the rows without weight averaging (see recipes/cluster/fsdp.yaml)
    assert {stem for c, stem, *_ in CASES if c.stem == "ddp_multi_node"} == set(PAPER_BATCH)


@pytest.mark.parametrize("cluster,stem,flags,factors,product", CASES,
                         ids=[f"{c.stem}+{s}" for c, s, *_ in CASES])
def test_cluster_and_recipe_give_the_paper_batch(cluster, stem, flags, factors, product):
    recipe = ROOT / "recipes" / "pretrain" / f"{stem}.yaml"
    got = global_batch(cluster, recipe, flags=flags)
    n, g, b, a = got
    assert got == factors, f"{cluster.name} + {recipe.name} {' '.join(flags)}: parsed {got}, header says {factors}"
    assert n * g * b * a == product == PAPER_BATCH[stem], (cluster.name, recipe.name, got)


@pytest.mark.parametrize("recipe", PRETRAIN, ids=lambda p: p.stem)
def test_pretrain_header_launch_gives_the_paper_batch(recipe):
    head = "\n".join(line for line in recipe.read_text().splitlines() if line.startswith("#"))
    launch = re.search(r"Launch: sbatch --nodes=(\d+) scripts/slurm/pretrain\.sh (\S+) (\S+)", head)
    stated = re.search(r"global batch (\d+) = (\d+) nodes x (\d+) GPUs x data\.batch_size (\d+) x accumulate (\d+)",
                       head)
    assert launch and stated, f"{recipe.name}: header lacks the Launch / Batch arithmetic line"
    assert (ROOT / launch[3]).resolve() == recipe.resolve()
    got = global_batch(ROOT / launch[2], recipe, flags=[f"--nodes={launch[1]}"])
    assert got == tuple(int(x) for x in stated.groups()[1:]), (recipe.name, got)
    assert got[0] * got[1] * got[2] * got[3] == int(stated[1]) == PAPER_BATCH[recipe.stem]


def test_a_wrong_batch_is_caught(tmp_path):
    """The check reads the YAML: a cluster file whose GPUs per node disagree with its header fails it."""
    bad = tmp_path / "ddp_multi_node.yaml"
    bad.write_text((ROOT / "recipes/cluster/ddp_multi_node.yaml").read_text().replace("devices: 8", "devices: 4"))
    recipe = ROOT / "recipes" / "pretrain" / "glip_t_c.yaml"
    assert global_batch(bad, recipe) == (4, 4, 2, 1)  # no sbatch: the YAML's own node and GPU counts
    (stem, flags, factors, product), = [x for x in header_lines(bad) if x[0] == "glip_t_c"]
    assert global_batch(bad, recipe, flags=[f for f in flags if not f.startswith("--nodes")]) != factors
