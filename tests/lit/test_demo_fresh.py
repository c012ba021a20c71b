"""``glip-pl demo --fresh`` moves the previous run aside instead of training beside its checkpoints (which made the
new run write ``last-v1.ckpt`` and the demo draw from the stale ``last.ckpt``)."""

from pathlib import Path

from glip_pl.cli_demo import _set_aside


def test_fresh_moves_the_previous_run_aside(tmp_path):
    run = tmp_path / "runs" / "demo"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"old")
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(f"trainer:\n  default_root_dir: {run}\n")
    _set_aside(recipe)
    assert not run.exists()
    moved = list((tmp_path / "runs").glob("demo.prev-*"))
    assert len(moved) == 1 and (moved[0] / "checkpoints" / "last.ckpt").read_bytes() == b"old"
    _set_aside(recipe)  # nothing there: nothing to do
    assert len(list((tmp_path / "runs").iterdir())) == 1
