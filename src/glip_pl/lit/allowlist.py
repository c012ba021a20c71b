"""What a recipe may name: the classes ``glip-pl fit/validate/test`` can import, and nothing callable besides.

A recipe (or a flag) is untrusted text, and jsonargparse turns strings into objects by many routes (``class_path``
at any depth, ``Callable`` / ``type`` parameters, bare class names, inline JSON, ``--trainer.callbacks+=``). All of
them pass jsonargparse's import path policy (also for the defining module, so the re-export
``lightning.pytorch.callbacks.os.system`` is caught as ``posix.system``): ``import_policy`` closes them there, at
the one place they share, rather than by guessing the routes. ``check_class_paths`` names the file and key first;
``refuse_callables`` refuses functions even from allowed modules.
"""

from __future__ import annotations

import inspect
import os
import re
from contextlib import contextmanager
from pathlib import Path

ALLOWED_CLASS_PREFIXES = (
    "lightning.pytorch.callbacks.", "lightning.pytorch.loggers.", "lightning.pytorch.strategies.",
    "lightning.pytorch.plugins.", "lightning.pytorch.profilers.", "lightning.pytorch.accelerators.",
    "lightning.fabric.plugins.environments.", "glip_pl.lit.", "glip_pl.label.datamodule.",
)
# More specific than an allowed prefix, so denied although under it (jsonargparse: the most specific entry decides).
DENIED_CLASSES = ("lightning.pytorch.callbacks.LambdaCallback", "lightning.pytorch.callbacks.lambda_function")
_DENIED_MESSAGE = re.compile(r"Importing '([\w.]+)' is not allowed")


class RecipeRefused(SystemExit):
    """A ``SystemExit``: the CLI prints it and exits 1."""


def _refusal(lines) -> RecipeRefused:
    body = "\n".join(f"  {w}: {c!r}" for w, c in lines)
    return RecipeRefused(f"[glip_pl] refusing import path(s) outside the allow-list "
                         f"{tuple(p.rstrip('.') for p in ALLOWED_CLASS_PREFIXES)} (no functions, no LambdaCallback):\n"
                         f"{body}")


def _walk(obj, where: str = ""):
    """(key path, value) of every leaf of a yaml document / jsonargparse Namespace, lists as ``[i]``."""
    if hasattr(obj, "__dict__") and type(obj).__name__ == "Namespace":
        obj = vars(obj)
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "__path__":
                continue
            yield from _walk(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{where}[{i}]")
    else:
        yield where or "<root>", obj


def _class_paths(obj):
    for where, v in _walk(obj):
        if where == "class_path" or where.endswith(".class_path"):
            yield where.rsplit(".", 1)[0] if "." in where else "<root>", v


def class_path_allowed(path) -> bool:
    """A bare class name (resolved by jsonargparse among already imported subclasses) or an allowed dotted one."""
    if not isinstance(path, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", path):
        return False
    if path.startswith(DENIED_CLASSES) or path in ("LambdaCallback",):
        return False
    return "." not in path or (path.startswith(ALLOWED_CLASS_PREFIXES) and path.rsplit(".", 1)[1][:1].isupper())


def _given_values(args):
    """(where, parsed yaml value) of every ``--config`` file and every flag value in ``args``."""
    import yaml

    args = [str(a) for a in (args or [])]
    for i, a in enumerate(args):
        flag, eq, value = a.partition("=")
        if not eq and flag.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
        elif not eq:
            continue
        if flag in ("--config", "-c") and os.path.isfile(value):
            try:
                yield value, yaml.safe_load(Path(value).read_text())
            except yaml.YAMLError as e:
                raise RecipeRefused(f"[glip_pl] {value}: not safe YAML: {e}") from None
            continue
        try:
            yield flag, yaml.safe_load(value)
        except yaml.YAMLError:
            yield flag, value


def check_class_paths(args) -> None:
    """Refuse a foreign ``class_path`` in config files or flags before anything is imported."""
    bad = []
    for where, doc in _given_values(args):
        if not where.startswith("-") or where in ("--config", "-c"):  # a config file
            bad += [(f"{where}: {w}", c) for w, c in _class_paths(doc) if not class_path_allowed(c)]
            continue
        if isinstance(doc, str) and (where.endswith(".class_path") or (
                where.startswith(("--trainer.callbacks", "--trainer.logger", "--trainer.strategy", "--trainer.plugins",
                                  "--trainer.profiler")) and "." in doc and not doc.lstrip().startswith("-"))):
            if not class_path_allowed(doc):
                bad.append((where, doc))
            continue
        bad += [(f"{where}: {w}", c) for w, c in _class_paths(doc) if not class_path_allowed(c)]
    if bad:
        lines = "\n".join(f"  {w}: {c!r}" for w, c in bad)
        raise RecipeRefused(f"[glip_pl] refusing class_path(s) outside the allow-list {ALLOWED_CLASS_PREFIXES}:\n"
                            f"{lines}")


@contextmanager
def import_policy():
    """jsonargparse imports only ``ALLOWED_CLASS_PREFIXES`` (not ``DENIED_CLASSES``) while active; its policy is
    process-wide, so the previous one is restored on exit."""
    from jsonargparse import _common, set_parsing_settings

    saved = {k: _common.parsing_settings[k] for k in ("import_path_verdicts", "import_paths_enforced")}
    set_parsing_settings(import_path_denylist=["*", *DENIED_CLASSES],
                         import_path_allowlist=[p.rstrip(".") for p in ALLOWED_CLASS_PREFIXES])
    try:
        yield
    finally:
        _common.parsing_settings.update(saved)


def _given_strings(args):
    return [(f"{src}: {w}" if not src.startswith("-") else (src if w == "<root>" else f"{src}: {w}"), v)
            for src, doc in _given_values(args) for w, v in _walk(doc) if isinstance(v, str)]


def _where_given(path: str, given) -> list:
    """Where ``path`` was given, or the re-export that led to it (``a.b.os.system`` is denied as ``posix.system``)."""
    tail = path.rsplit(".", 1)[-1]
    return [(w, v) for w, v in given if v == path] or [(w, v) for w, v in given if v.endswith("." + tail)]


def denied_import_error(message: str, args) -> RecipeRefused | None:
    """The refusal naming the file and key of each path ``import_policy`` denied; None for any other error."""
    denied = list(dict.fromkeys(_DENIED_MESSAGE.findall(message)))
    if not denied:
        return None
    given, keys = _given_strings(args), ".".join(re.findall(r'Parser key "([^"]+)"', message))
    return _refusal([hit for path in denied for hit in (_where_given(path, given) or [(keys or "?", path)])])


def _code_defaults(spec) -> dict:
    """The init defaults of a parsed ``class_path`` spec's class (already imported by the parse)."""
    import importlib

    path = getattr(spec, "class_path", None)
    if not isinstance(path, str) or "." not in path:
        return {}
    try:
        mod, name = path.rsplit(".", 1)
        sig = inspect.signature(getattr(importlib.import_module(mod), name).__init__)
    except (ImportError, AttributeError, TypeError, ValueError):
        return {}
    return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def _functions(obj, where: str = ""):
    """Every function in a parsed config but a class's own default (``BackboneFinetuning``'s ``lambda_func``)."""
    if type(obj).__name__ == "Namespace":
        defaults = _code_defaults(obj)
        for k, v in vars(obj).items():
            key = f"{where}.{k}" if where else k
            if k in ("init_args", "dict_kwargs") and defaults and type(v).__name__ in ("Namespace", "dict"):
                items = vars(v).items() if type(v).__name__ == "Namespace" else v.items()
                for name, val in items:
                    if inspect.isroutine(val) and defaults.get(name, None) is val:
                        continue
                    yield from _functions(val, f"{key}.{name}")
            else:
                yield from _functions(v, key)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _functions(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _functions(v, f"{where}[{i}]")
    elif inspect.isroutine(obj) or type(obj).__name__ == "partial":
        yield where or "<root>", obj


def refuse_callables(config, args=(), subcommand: str | None = None) -> None:
    """Recipes may name classes only: refuse a function anywhere in the parsed (not yet instantiated) config."""
    bad = list(_functions(config))
    if not bad:
        return
    given, lines = _given_strings(args), []
    for w, v in bad:
        name = f"{getattr(v, '__module__', None) or '?'}.{getattr(v, '__qualname__', repr(v))}"
        if subcommand and w.startswith(subcommand + "."):
            w = w[len(subcommand) + 1:]
        lines += _where_given(name, given) or [(w, name)]
    raise _refusal(lines)
