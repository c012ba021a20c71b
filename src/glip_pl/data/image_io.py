"""One way to turn an image file into 8-bit RGB pixels, used by every path that decodes images (shard reading for
training and evaluation, the converters' size probe, ``glip-pl predict``), so a box means the same pixels everywhere.

* EXIF orientation is applied: the converters record the upright size, which is what annotation tools show.
* High-bit-depth images are scaled, not clipped (``convert("RGB")`` turns a 16-bit PNG almost white); integer
  modes are taken as 16-bit data (what Pillow opens 16-bit PNG/TIFF as), float images in [0, 1] are scaled by 255.
* Transparency is composited over white, as a viewer shows it, not whatever colour transparent pixels hold.

No torch import: the converters' worker processes use it.
"""

from __future__ import annotations

import io
import os
from typing import Union

EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # transpose / rotate 90 / transverse / rotate 270
BACKGROUND = (255, 255, 255)


def _orientation(im) -> int:
    try:
        return int(im.getexif().get(EXIF_ORIENTATION) or 1)
    except Exception:  # a broken EXIF block: treated as upright
        return 1


def oriented_size(im) -> tuple:
    """Upright (width, height) from the header only."""
    w, h = im.size
    return (h, w) if _orientation(im) in _SWAPS_SIDES else (w, h)


def _scale_to_uint8(im):
    import numpy as np
    from PIL import Image

    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        finite = a[np.isfinite(a)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            a = a * 255.0
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
    else:  # I;16, I;16B, I;16L, I;16N, I: 16-bit samples (I;16B arrives big-endian: astype makes it native)
        a = a.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(im):
    """An upright 8-bit RGB copy of the PIL image ``im``."""
    from PIL import Image, ImageOps

    if _orientation(im) != 1:  # (most images: no copy) the result drops the tag, so applying it twice is harmless
        im = ImageOps.exif_transpose(im)
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        im = _scale_to_uint8(im)
    if im.mode == "P" or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV: Pillow's conversions are right for 8-bit modes


def open_rgb(source: Union[bytes, str, "os.PathLike"]):
    """PIL's errors pass through for the caller to name its shard or file."""
    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
        im.load()
        return to_rgb(im)
