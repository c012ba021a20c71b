"""The ``glip-pl`` command: one sub-command per job.

Each sub-command lives in the package that owns the job, in its ``cli.py`` or a ``cli_<command>.py`` beside it,
and exposes ``register(subparsers)``, which sets ``func`` (namespace -> exit code). Modules are imported lazily so a
missing optional dependency only affects its own command: one line naming the extra (exit status 2), not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMANDS = {
    "shards": "glip_pl.data.cli",
    "demo": "glip_pl.cli_demo",
    "evaluate": "glip_pl.eval.cli",
    "predict": "glip_pl.eval.cli_predict",
    "odinw": "glip_pl.eval.cli_odinw",
    "import-official": "glip_pl.checkpoints.cli_official",
    "pseudo-label": "glip_pl.label.cli",
    "pseudo-score": "glip_pl.label.cli_score",
    "consolidate": "glip_pl.checkpoints.cli_consolidate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glip-pl", description="GLIP pretraining with PyTorch Lightning")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name}: glip-pl {name} --config RECIPE.yaml (see --help)", add_help=False)
    sub.add_parser(BATCH_PREDICT, help="LightningCLI predict: glip-pl predict-batch --config RECIPE.yaml (see --help)",
                   add_help=False)
    for name, module in COMMANDS.items():
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as e:  # a command whose module is not built yet / optional dependency missing
            if e.name and (e.name == module or module.startswith(e.name + ".") or e.name.startswith("glip_pl")):
                continue
            raise
    return parser


LIGHTNING_COMMANDS = ("fit", "validate", "test")
BATCH_PREDICT = "predict-batch"  # LightningCLI's predict, apart from ``predict`` (the image predictor)

# pip extra -> (how the message names it, the top-level packages it brings that glip_pl imports); see pyproject.toml
EXTRAS = {
    "train": ("the training extra", ("lightning", "lightning_fabric", "pytorch_lightning", "webdataset", "wandb",
                                      "jsonargparse", "torchmetrics", "yaml", "tqdm", "pyarrow")),
    "label": ("the labelling extra", ("spacy",)),
    "deepspeed": ("the DeepSpeed extra", ("deepspeed",)),
}
# Commands checked up front (a job should not fail half-way, after loading a model, on a missing package); the
# label extra includes train. Other commands fall back to the ModuleNotFoundError they hit.
COMMAND_EXTRA = {"fit": "train", "validate": "train", "test": "train", BATCH_PREDICT: "train", "demo": "train",
                 "pseudo-label": "label"}
NEEDS = {"train": ("lightning", "webdataset", "jsonargparse"), "label": ("lightning", "webdataset", "spacy")}


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ImportError:
        return False


def missing_extra(command: str, error: ModuleNotFoundError):
    """The one-line message for ``command`` failing on a package of an extra, or None (then it is a real error)."""
    top = (error.name or "").split(".")[0]
    owner = next((extra for extra, (_, pkgs) in EXTRAS.items() if top in pkgs), None)
    if owner is None:
        return None
    extra = COMMAND_EXTRA.get(command, owner)
    if owner not in ("train", extra):  # e.g. fit --trainer.strategy deepspeed: name the extra that is missing
        extra = owner
    return f"glip-pl {command} needs {EXTRAS[extra][0]}: pip install 'glip_pl[{extra}]'"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if command == "predict" and any(a in ("-c", "--config") or a.startswith("--config=") for a in argv):
        # LightningCLI's predict has its own command: say so rather than fail on an unknown option
        print("glip-pl predict: error: --config belongs to LightningCLI's batch predict, now its own command: "
              f"glip-pl {BATCH_PREDICT} --config RECIPE.yaml ...", file=sys.stderr)
        return 2
    lightning_cli = command in LIGHTNING_COMMANDS or command == BATCH_PREDICT
    extra = "train" if lightning_cli else COMMAND_EXTRA.get(command)
    if extra and not {"-h", "--help"} & set(argv[1:2]):
        missing = next((p for p in NEEDS[extra] if not _installed(p)), None)
        if missing:
            print(missing_extra(command, ModuleNotFoundError(name=missing)), file=sys.stderr)
            return 2
    try:
        if lightning_cli:
            from glip_pl.lit.cli import run

            return run(["predict" if command == BATCH_PREDICT else command, *argv[1:]])
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except ModuleNotFoundError as e:
        message = missing_extra(command, e)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
