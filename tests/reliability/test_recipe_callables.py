"""A recipe cannot make ``glip-pl fit`` call or import anything outside the allow-list (issue 21): every place where
jsonargparse turns a string into a callable or a class — Callable-typed init arguments of allowed callbacks and
strategies, ``dict_kwargs``, a ``class_path`` nested in ``init_args``, ``LambdaCallback``, ``--trainer.callbacks+=``
and inline JSON — is refused with the recipe key named, before the target runs or its module is imported."""

import json
import sys

import pytest
import yaml

from glip_pl.lit.cli import run

# Dangerous callables, a module whose import alone has an effect (evilmod, made by the fixture), a re-export of
# os.system through an allowed module, and a function of an allowed module (classes only may be named).
TARGETS = ["os.system", "subprocess.run", "builtins.exec", "builtins.eval", "shutil.rmtree",
           "importlib.import_module", "evilmod.hook", "lightning.pytorch.callbacks.model_checkpoint.os.system",
           "glip_pl.lit.cli.run"]

# (place, recipe trainer-section builder, recipe key that must be named)
PLACES = {
    "ModelPruning.amount": (lambda t: {"callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelPruning",
                                                      "init_args": {"pruning_fn": "l1_unstructured", "amount": t}}]},
                            "trainer.callbacks[0].init_args.amount"),
    "ThroughputMonitor.batch_size_fn": (
        lambda t: {"callbacks": [{"class_path": "lightning.pytorch.callbacks.ThroughputMonitor",
                                  "init_args": {"batch_size_fn": t}}]},
        "trainer.callbacks[0].init_args.batch_size_fn"),
    "BackboneFinetuning.lambda_func": (
        lambda t: {"callbacks": [{"class_path": "lightning.pytorch.callbacks.BackboneFinetuning",
                                  "init_args": {"lambda_func": t}}]},
        "trainer.callbacks[0].init_args.lambda_func"),
    "StochasticWeightAveraging.avg_fn": (
        lambda t: {"callbacks": [{"class_path": "lightning.pytorch.callbacks.StochasticWeightAveraging",
                                  "init_args": {"swa_lrs": 0.1, "avg_fn": t}}]},
        "trainer.callbacks[0].init_args.avg_fn"),
    "DDPStrategy.ddp_comm_hook": (
        lambda t: {"strategy": {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                                "init_args": {"ddp_comm_hook": t}}},
        "trainer.strategy.init_args.ddp_comm_hook"),
    "dict_kwargs": (lambda t: {"callbacks": [{"class_path": "lightning.pytorch.callbacks.BackboneFinetuning",
                                              "dict_kwargs": {"lambda_func": t}}]},
                    "trainer.callbacks[0].dict_kwargs.lambda_func"),
    "nested class_path": (lambda t: {"callbacks": [{"class_path": "lightning.pytorch.callbacks.BackboneFinetuning",
                                                    "init_args": {"lambda_func": {"class_path": t}}}]},
                          "trainer.callbacks[0].init_args.lambda_func"),
    "LambdaCallback": (lambda t: {"callbacks": [{"class_path": "lightning.pytorch.callbacks.LambdaCallback",
                                                 "init_args": {"on_fit_start": t}}]},
                       "trainer.callbacks[0]"),
}


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A module on sys.path that leaves a marker when imported and when its ``hook`` is called."""
    marker = tmp_path / "owned"
    (tmp_path / "evilmod.py").write_text(
        f"open({str(marker)!r}, 'a').write('imported\\n')\n"
        f"def hook(*a, **k):\n    open({str(marker)!r}, 'a').write('called\\n')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "evilmod", raising=False)
    return marker


def _recipe(tmp_path, trainer: dict):
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False,
                                               "default_root_dir": str(tmp_path / "run"), **trainer},
                                   "model": {"preset": "tiny"}, "data": {"train": []}}))
    return cfg


def _refused(args, marker, *expected, capsys=None):
    """``glip-pl fit ARGS`` stops before running anything, naming ``expected`` (the recipe key ...). A function of an
    allowed module whose signature does not fit the parameter's type (``capsys`` given) may instead be jsonargparse's
    own type error (exit 2, the key on stderr): refused either way."""
    with pytest.raises(SystemExit) as e:
        run(["fit", *args])
    msg = str(e.value.code)
    if capsys is not None and e.value.code == 2:
        msg = capsys.readouterr().err
        expected = [k.rsplit(".", 1)[-1] for k in expected]
    else:
        assert e.value.code not in (0, None) and msg.startswith("[glip_pl] refusing"), msg
    for part in expected:
        assert part in msg, (part, msg)
    assert not marker.exists(), marker.read_text()
    assert "evilmod" not in sys.modules


# every target in one place, every place with the import-side-effect module and one more target (each run builds
# the whole CLI parser, ~1 s: the full product would take minutes)
CASES = sorted({("ThroughputMonitor.batch_size_fn", t) for t in TARGETS}
               | {(p, t) for i, p in enumerate(sorted(PLACES)) for t in ("evilmod.hook", TARGETS[i % len(TARGETS)])})


@pytest.mark.parametrize("place,target", CASES)
def test_recipe_cannot_name_a_callable(tmp_path, evil, place, target, capsys):
    build, key = PLACES[place]
    cfg = _recipe(tmp_path, build(target))
    _refused(["--config", str(cfg)], evil, key, capsys=capsys if target.startswith("glip_pl.") else None)


@pytest.mark.parametrize("target", ["os.system", "evilmod.hook"])
def test_flags_cannot_name_a_callable(tmp_path, evil, target):
    base = _recipe(tmp_path, {})
    cb = {"class_path": "lightning.pytorch.callbacks.ThroughputMonitor", "init_args": {"batch_size_fn": target}}
    _refused(["--config", str(base), "--trainer.callbacks", json.dumps([cb])], evil, "--trainer.callbacks", target)
    _refused(["--config", str(base), "--trainer.callbacks+=lightning.pytorch.callbacks.ThroughputMonitor",
              f"--trainer.callbacks.batch_size_fn={target}"], evil, "batch_size_fn")
    _refused(["--config", str(base), "--trainer.callbacks+=lightning.pytorch.callbacks.LambdaCallback",
              f"--trainer.callbacks.on_fit_start={target}"], evil, "LambdaCallback")
    # a whole inline config
    inline = {"trainer": {"callbacks": [cb]}}
    _refused(["--config", str(base), "--config", json.dumps(inline)], evil, target)


def test_class_path_inside_data_and_model_values_is_refused(tmp_path, evil):
    spec = {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(evil)]}}
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "data": {"train": [spec]}}))
    _refused(["--config", str(cfg)], evil, "data.train[0]", "subprocess.Popen")


def test_optimizer_options_do_not_exist(tmp_path, evil, capsys):
    """auto_configure_optimizers=False: LightningCLI adds no --optimizer/--lr_scheduler to name a class with."""
    for flag in ("--optimizer", "--lr_scheduler"):
        with pytest.raises(SystemExit) as e:
            run(["fit", "--config", str(_recipe(tmp_path, {})), flag, "evilmod.hook"])
        assert e.value.code == 2
        assert "evilmod" not in sys.modules and not evil.exists()
        assert flag.lstrip("-") in capsys.readouterr().err


def test_policy_is_lifted_after_the_cli(tmp_path, evil):
    """jsonargparse keeps its import policy process-wide: the CLI restores the previous one, refused or not (the
    shipped recipes parsing under the policy is tests/lit/test_recipes.py)."""
    from jsonargparse import _common

    before = {k: _common.parsing_settings[k] for k in ("import_path_verdicts", "import_paths_enforced")}
    _refused(["--config", str(_recipe(tmp_path, PLACES["dict_kwargs"][0]("os.system")))], evil)
    assert {k: _common.parsing_settings[k] for k in before} == before


def test_a_class_own_default_function_is_not_refused(tmp_path):
    """``BackboneFinetuning``'s ``lambda_func`` defaults to a function in Lightning's code: a recipe that does not
    set it parses (only functions a recipe names are refused)."""
    from glip_pl.lit.cli import GLIPCLI

    class ParseOnly(GLIPCLI):
        def instantiate_classes(self) -> None:
            pass

    cfg = _recipe(tmp_path, {"callbacks": [{"class_path": "lightning.pytorch.callbacks.BackboneFinetuning"}]})
    parsed = ParseOnly(args=["--config", str(cfg)], run=False).config
    assert parsed.trainer.callbacks[0].init_args.lambda_func.__name__ == "multiplicative"
