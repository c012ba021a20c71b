"""Every recipe parses through the real CLI (stacked on each cluster file); unknown keys are clear errors."""

from pathlib import Path

import pytest

from glip_pl.lit.cli import GLIPCLI
from glip_pl.lit.datamodule import GroundingDataModule
from glip_pl.lit.module import GLIPLitModule

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
CLUSTER = sorted((ROOT / "recipes" / "cluster").glob("*.yaml"))
# recipes/label/* are pseudo-labelling configs (glip-pl pseudo-label), parsed by tests/label; recipes/base/* are the
# shared parts that recipes name with __base__ (tests/lit/test_recipe_composition.py)
MAIN = [r for r in RECIPES if not {"cluster", "label", "base"} & set(r.parts)]


class ParseOnly(GLIPCLI):
    """The production parser and checks, without building models or trainers."""

    def instantiate_classes(self) -> None:
        pass


def parse(*configs, extra=()):
    args = [a for c in configs for a in ("--config", str(c))] + list(extra)
    cli = ParseOnly(GLIPLitModule, GroundingDataModule, args=args, run=False)  # run=False: no subcommand
    return cli.config


def test_recipes_exist():
    names = {r.stem for r in RECIPES}
    assert {"glip_t_a", "glip_t_b", "glip_t_c", "glip_t", "glip_l"} <= names
    assert {"ddp_single_node", "ddp_multi_node", "deepspeed_zero2", "fsdp"} <= {c.stem for c in CLUSTER}
    assert {"cpu_smoke", "demo"} <= names


@pytest.mark.parametrize("recipe", MAIN, ids=lambda p: p.stem)
def test_recipe_parses(recipe):
    cfg = parse(recipe)
    assert cfg.model.preset in ("tiny", "glip_t_a", "glip_t", "glip_l")
    assert cfg.data.init_args.train, "a recipe names its training shards"
    if recipe.stem in ("glip_t", "glip_l"):  # the self-training rows: gold + pseudo-labelled captions
        assert cfg.data.class_path == "glip_pl.label.datamodule.TeacherStudentDataModule"
        assert [s["urls"] if isinstance(s, dict) else s.urls for s in cfg.data.init_args.pseudo] == \
            [f"shards/{'cap4m' if recipe.stem == 'glip_t' else 'cap24m'}_pseudo"]
    elif "label" not in recipe.parts:
        assert cfg.data.class_path == "glip_pl.lit.datamodule.GroundingDataModule"  # plain data: keys
    if "pretrain" in recipe.parts:
        head = recipe.read_text().splitlines()[:9]
        text = "\n".join(head)
        for word in ("Paper zero-shot COCO", "Data:", "Hardware:", "Launch:", "Batch arithmetic"):
            assert word in text, (recipe.name, word)


@pytest.mark.parametrize("cluster", CLUSTER, ids=lambda p: p.stem)
def test_cluster_files_stack_with_a_recipe(cluster):
    cfg = parse(cluster, ROOT / "recipes" / "pretrain" / "glip_t_c.yaml")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.model.preset == "glip_t"


def test_unknown_key_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "recipes/local/cpu_smoke.yaml").read_text().replace("  lr: 0.001", "  lrr: 0.001"))
    with pytest.raises(SystemExit):
        parse(bad)
    err = capsys.readouterr().err
    assert "lrr" in err
