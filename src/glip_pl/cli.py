"""The ``glip-pl`` command: one sub-command per job.

Each sub-command lives in the module that owns the job and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed namespace; returns an exit code). Modules are imported lazily so
``glip-pl --help`` stays fast and a missing optional dependency only affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command name -> module that registers it
COMMANDS = {
    "shards": "glip_pl.data.cli",
    "demo": "glip_pl.demo",
    "evaluate": "glip_pl.eval.cli",
    "predict": "glip_pl.eval.cli_predict",
    "import-official": "glip_pl.official_cli",
    "pseudo-label": "glip_pl.label.cli",
    "pseudo-score": "glip_pl.label.score",
    "consolidate": "glip_pl.lit.consolidate",
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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Training/evaluation runs go to LightningCLI (``glip-pl fit --config a.yaml --config b.yaml``).
    if argv and (argv[0] in LIGHTNING_COMMANDS or argv[0] == BATCH_PREDICT):
        from glip_pl.lit.cli import run

        return run(["predict" if argv[0] == BATCH_PREDICT else argv[0], *argv[1:]])
    if argv and argv[0] == "predict" and any(a in ("-c", "--config") or a.startswith("--config=") for a in argv):
        # ``predict --config`` used to switch silently to LightningCLI's predict: say where that went
        print("glip-pl predict: error: --config belongs to LightningCLI's batch predict, now its own command: "
              f"glip-pl {BATCH_PREDICT} --config RECIPE.yaml ...", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
