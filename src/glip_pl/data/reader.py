"""Reading shards: url lists, tar members grouped into raw samples, and safe decoding.

Tars are read here, not by ``webdataset.DataPipeline``, so that no member reaches a default decoder (webdataset
hands ``.pyd``/``.pickle`` to ``pickle.loads``: code execution for anyone who can write a shard) and every random
choice is ours to seed for an exact resume. Pickle-based members raise ``ShardError``.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from typing import Iterable, Iterator, Optional, Union

from .schema import IMAGE_EXTS, PICKLE_EXTS, ConversionError, Sample, ShardError, Where, sample_from_record, validate_record
from .shard_index import listed_shards

Urls = Union[str, Iterable[str]]


def expand_urls(urls: Urls, split: Optional[str] = None) -> list:
    """Shard urls from a list, a brace pattern ("a-{000000..000009}.tar"), a .tar path, or a directory (its
    index.json's checked shards, else its ``[<split>-]*.tar`` in sorted order)."""
    if isinstance(urls, (str, os.PathLike)):
        urls = str(urls)
        if os.path.isdir(urls):
            listed = listed_shards(urls, split)
            if listed is not None:
                if not listed:
                    raise ShardError(urls, "-", "shards", "index.json lists no shards")
                return listed
            pattern = f"{split}-*.tar" if split else "*.tar"
            found = sorted(glob.glob(os.path.join(urls, pattern)))
            if not found:
                raise ShardError(urls, "-", "shards", f"no shards matching {pattern!r} in this directory")
            return found
        from braceexpand import braceexpand

        found = [u for part in urls.split("::") for u in braceexpand(part)]
        if len(found) == 1 and not _is_remote(found[0]) and not os.path.exists(found[0].removeprefix("file:")):
            raise ShardError(urls, "-", "shards", "no such directory or shard file")
        return found
    return [str(u) for u in urls]


def _is_remote(url: str) -> bool:
    return url.startswith(("pipe:", "http://", "https://", "gs://", "s3://"))


def _open(url: str):
    if _is_remote(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if url.startswith("file:"):
        url = url[5:]
    return open(url, "rb")


def split_key(name: str) -> tuple:
    """(key, lowercase extension) by the WebDataset convention: the basename splits at its first "."."""
    d, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return os.path.join(d, stem) if d else stem, ext.lower()


def iter_raw(url: str) -> Iterator[dict]:
    """Raw samples of one shard: {"__key__", "__url__", ext: bytes, ...}."""
    cur: Optional[dict] = None
    try:
        with _open(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                if key.startswith("__") or not ext:
                    continue
                if cur is None or cur["__key__"] != key:
                    if cur is not None:
                        yield cur
                    cur = {"__key__": key, "__url__": url}
                if ext in cur:
                    raise ShardError(url, key, ext, "member appears twice in one sample")
                cur[ext] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError) as e:
        raise ShardError(url, cur["__key__"] if cur else "-", "tar", f"cannot read shard: {e}") from e
    if cur is not None:
        yield cur


def decode_image(data: bytes, url: str = "", key: str = "", ext: str = "jpg"):
    from .image_io import open_rgb

    try:
        return open_rgb(data)
    except Exception as e:
        raise ShardError(url, key, ext, f"undecodable image: {e}") from None


def decode_sample(raw: dict, decode_images: bool = True) -> Sample:
    """The safe ``decode`` stage."""
    url, key = raw.get("__url__", ""), raw.get("__key__", "")
    for ext in raw:
        if ext.startswith("__"):
            continue
        if ext.rsplit(".", 1)[-1] in PICKLE_EXTS:
            raise ShardError(url, key, ext, "pickle-based members are refused (glip_pl never unpickles shard data)")
    if "json" not in raw:
        raise ShardError(url, key, "json", "sample has no .json record")
    try:
        rec = json.loads(raw["json"])
    except (ValueError, TypeError, RecursionError) as e:  # bad utf-8 / syntax / absurd nesting
        raise ShardError(url, key, "json", f"invalid json: {e}") from None
    if not isinstance(rec, dict):
        raise ShardError(url, key, "json", f"record must be a json object, got {type(rec).__name__}")
    ext = rec.get("image") or next((e for e in raw if e in IMAGE_EXTS), None)
    if not isinstance(ext, str) or ext not in raw or ext.startswith("__"):
        raise ShardError(url, key, str(ext or "image"), "sample has no image member")
    for f in ("id", "kind", "width", "height"):
        if f not in rec:
            raise ShardError(url, key, f"json.{f}", "required field is missing")
    # Untrusted: the conversion's checks again, so a bad record is a ShardError here, not an IndexError in a transform.
    rec.setdefault("source", "")
    rec.setdefault("boxes", [])
    try:
        validate_record(rec, Where(url, key))
    except ConversionError as e:
        raise ShardError(url, key, f"json.{e.field}", f"{e.message} [{e.code}]") from None
    except Exception as e:  # wrong types in places the validator assumes (e.g. boxes: 3)
        raise ShardError(url, key, "json", f"malformed record: {type(e).__name__}: {e}") from None
    image = None
    if decode_images:
        image = decode_image(raw[ext], url, key, ext)
        if image.size != (rec["width"], rec["height"]):
            raise ShardError(url, key, ext, f"image is {image.size[0]}x{image.size[1]} but the record says "
                                            f"{rec['width']}x{rec['height']}")
    try:
        return sample_from_record(rec, image, key=key, url=url)
    except Exception as e:
        raise ShardError(url, key, "json", f"malformed record: {type(e).__name__}: {e}") from None


def iter_samples(urls: Urls, split: Optional[str] = None, decode_images: bool = True) -> Iterator[Sample]:
    """Decoded samples of the given shards in stored order, for people and tests (no shuffling, no transforms)."""
    for url in expand_urls(urls, split):
        for raw in iter_raw(url):
            yield decode_sample(raw, decode_images)
