"""Every option of every ``glip-pl`` sub-command has a help line (issue 24 point 5).

argparse sub-commands: every option of every (nested) parser. LightningCLI sub-commands (fit, validate, test,
predict-batch) take their help from docstrings (jsonargparse reads ``Args:`` sections): every ``__init__``
argument of glip_pl's own model, data modules, callbacks, loggers and strategies, parsed as LightningCLI parses it.
"""

import argparse
import importlib
import inspect
import pkgutil

import pytest


def _walk(parser, path):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_argparse_option_has_help():
    from glip_pl.cli import build_parser

    options = list(_walk(build_parser(), "glip-pl"))
    commands = {p for p, _ in options}
    assert {"glip-pl shards synthetic", "glip-pl evaluate coco", "glip-pl predict", "glip-pl pseudo-label",
            "glip-pl consolidate", "glip-pl import-official", "glip-pl odinw"} <= commands, sorted(commands)
    missing = [f"{p} {'/'.join(a.option_strings) or a.dest}" for p, a in options
               if a.help != argparse.SUPPRESS and not (a.help or "").strip()]
    assert not missing, missing


def _own_classes():
    import lightning as L
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.strategies import Strategy

    import glip_pl.lit
    from glip_pl.label.datamodule import TeacherStudentDataModule

    bases = (L.LightningModule, L.LightningDataModule, L.Callback, Logger, Strategy)
    found = {TeacherStudentDataModule}
    for info in pkgutil.iter_modules(glip_pl.lit.__path__):
        module = importlib.import_module(f"glip_pl.lit.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and not name.startswith("_") and issubclass(cls, bases):
                found.add(cls)
    return sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}")


@pytest.mark.parametrize("cls", _own_classes(), ids=lambda c: c.__qualname__)
def test_every_init_argument_of_glip_pl_classes_has_help(cls):
    from jsonargparse import ArgumentParser

    own = [n for n, p in inspect.signature(cls.__init__).parameters.items()
           if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "x")
    helps = {a.dest[2:]: a.help for a in parser._actions if a.dest.startswith("x.")}
    missing = [n for n in own if not (helps.get(n) or "").strip()]
    assert not missing, f"{cls.__module__}.{cls.__qualname__}: {missing}"
