"""Fixtures of the data tests: image helpers (the synthetic shard set is in tests/conftest.py)."""

import os

import pytest


def write_image(path, w, h, fmt=None, color=(120, 60, 200)):
    """A small solid image file (format from the extension unless given)."""
    from PIL import Image

    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    Image.new("RGB", (w, h), color).save(str(path), format=fmt)
    return str(path)


@pytest.fixture
def make_image():
    return write_image


@pytest.fixture
def shards_cli():
    """Run ``glip-pl shards ...`` argv through the data CLI alone (the full parser also imports the model)."""
    import argparse

    from glip_pl.data.cli import register

    def run(argv):
        parser = argparse.ArgumentParser(prog="glip-pl")
        register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["shards"] + list(argv))
        return args.func(args)

    return run
