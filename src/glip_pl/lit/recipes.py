"""Recipes that name a base (``__base__: ../base/pretrain.yaml``, relative to the recipe): the base, recursively, with
the recipe's keys merged over it.

Mappings merge key by key, lists and values are replaced, ``key+:`` appends (as in jsonargparse), and a
``class_path``/``init_args`` mapping takes the base's plain keys as its ``init_args``, so a row can switch its data
module and keep the base's data settings. The composed mapping is what LightningCLI parses as that ``--config`` file.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import List, Optional

import yaml
from jsonargparse import ActionConfigFile, get_loader
from lightning.pytorch.cli import LightningArgumentParser

BASE_KEY = "__base__"


class RecipeError(ValueError):
    """A recipe's ``__base__`` cannot be followed."""


def _read(path: Path, asked_by: Optional[Path]) -> dict:
    where = f"{asked_by}: {BASE_KEY} {path}" if asked_by else str(path)
    try:
        doc = get_loader("yaml")(path.read_text())  # jsonargparse's safe loader: values read as the CLI reads them
    except OSError as e:
        raise RecipeError(f"{where}: cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML ({e})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise RecipeError(f"{where}: expected a mapping of config keys at the top level, got {type(doc).__name__}")
    return doc


def _bases(doc: dict, path: Path) -> List[Path]:
    value = doc.get(BASE_KEY)
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise RecipeError(f"{path}: {BASE_KEY} must be a path or a list of paths, got {value!r}")
    return [(path.parent / n).resolve() for n in names]


def recipe_chain(path, _stack: tuple = (), _asked_by: Optional[Path] = None) -> List[Path]:
    """The files that ``--config path`` applies, in order: its bases (recursively, each once), then itself."""
    path = Path(path).resolve()
    if path in _stack:
        loop = " -> ".join(str(p) for p in (*_stack[_stack.index(path):], path))
        raise RecipeError(f"{_stack[-1]}: {BASE_KEY} makes a cycle: {loop}")
    chain: List[Path] = []
    for base in _bases(_read(path, _asked_by), path):
        chain += [p for p in recipe_chain(base, (*_stack, path), path) if p not in chain]
    return [*chain, path]


def _as_spec(d: dict) -> dict:
    return d if "class_path" in d or "init_args" in d else {"init_args": d}


def merge(dst: dict, src: dict) -> dict:
    """``src`` merged over ``dst`` (a new mapping; neither argument is changed)."""
    if ("class_path" in dst or "class_path" in src) and (set(dst) | set(src)) - {"class_path", "init_args"}:
        dst, src = _as_spec(dst), _as_spec(src)
    out = dict(dst)
    for k, v in src.items():
        if isinstance(k, str) and k.endswith("+") and isinstance(v, list) and isinstance(out.get(k[:-1]), list):
            k, v = k[:-1], [*out[k[:-1]], *v]  # jsonargparse's list append, here against the base
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(path) -> dict:
    """The recipe as one mapping: its bases (recursively) with its own keys merged over them; no ``__base__``."""
    out: dict = {}
    for p in recipe_chain(path):
        out = merge(out, {k: v for k, v in _read(p, None).items() if k != BASE_KEY})
    return out


_composed: ContextVar = ContextVar("glip_pl_composed_recipe", default=None)


class RecipeConfigFile(ActionConfigFile):
    """``--config``: a recipe that names a base is parsed as its composed mapping (``load_recipe``)."""

    @staticmethod
    def apply_config(parser, cfg, dest, value) -> None:
        if not isinstance(value, (str, Path)) or not Path(value).is_file():
            try:
                doc = yaml.safe_load(value) if isinstance(value, str) else None
            except yaml.YAMLError:
                doc = None  # jsonargparse reports it
            if isinstance(doc, dict) and BASE_KEY in doc:
                raise TypeError(f"{BASE_KEY} works in a recipe file only (relative to its folder), not inline")
            return ActionConfigFile.apply_config(parser, cfg, dest, value)
        try:
            has_base = BASE_KEY in _read(Path(value), None)
        except RecipeError:
            return ActionConfigFile.apply_config(parser, cfg, dest, value)  # jsonargparse reports it as before
        try:
            composed = yaml.safe_dump(load_recipe(value), sort_keys=False) if has_base else None
        except RecipeError as e:
            raise TypeError(str(e)) from None  # jsonargparse reports a TypeError as the option's error
        token = _composed.set(composed)
        try:
            ActionConfigFile.apply_config(parser, cfg, dest, value)
        finally:
            _composed.reset(token)


class RecipeArgumentParser(LightningArgumentParser):
    """Parses a based recipe as ``RecipeConfigFile``'s composed text; its path still names it in messages."""

    def parse_string(self, content: str, *args, **kwargs):
        composed = _composed.get()
        if composed is not None:
            _composed.set(None)  # this file's text only, not a config that it loads in turn
            content = composed
        return super().parse_string(content, *args, **kwargs)
