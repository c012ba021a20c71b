"""One image decoder everywhere: 16-bit images scaled (not clipped to white), EXIF orientation applied, and the same
pixels from ``glip-pl predict``'s loading, a converted shard, and the training pipeline."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from glip_pl.data import ConversionError, iter_samples
from glip_pl.data.convert_coco import convert_coco
from glip_pl.data.image_io import open_rgb, to_rgb
from glip_pl.data.pipeline import SourceSpec, build_pipeline
from glip_pl.data.transforms import TransformConfig
from glip_pl.data.writer import read_index, write_samples
from glip_pl.eval.predictor import to_pil

W16, H16 = 64, 48


def _gradient16():
    """A 16-bit horizontal gradient over the whole 0..65535 range, and its mean in 8-bit units."""
    row = np.linspace(0, 65535, W16).round().astype(np.uint16)
    a = np.tile(row, (H16, 1))
    return a, a.mean() / 257.0


def _save_png16(path):
    a, mean8 = _gradient16()
    Image.fromarray(a).save(path, format="PNG")
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    return mean8


def _exif_jpeg(path, orientation=6):
    """A 40x20 stored JPEG, red left half / blue right half, whose EXIF says "rotate 90° clockwise to view"."""
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, format="JPEG", quality=95, exif=exif)
    with Image.open(path) as raw:
        return np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))


def _coco(root, image_name, w, h, boxes):
    ann = {"images": [{"id": 1, "file_name": image_name, "width": w, "height": h}],
           "annotations": [{"id": 10 + i, "image_id": 1, "category_id": 1, "bbox": b, "iscrowd": 0}
                           for i, b in enumerate(boxes)],
           "categories": [{"id": 1, "name": "thing"}]}
    path = os.path.join(root, "ann.json")
    with open(path, "w") as f:
        json.dump(ann, f)
    return path


def _training_image(shards, tokenizer, short):
    """The decoded training image (uint8 (3, h, w)) of the first sample, through decode → transform → collate."""
    stream = build_pipeline([SourceSpec(shards, split="train")], tokenizer, batch_size=1, train=False,
                            transforms=TransformConfig(min_sizes=(short,), flip_prob=0.0))
    batch = next(iter(stream))
    h, w = batch.image_sizes[0].tolist()
    return batch.images[0, :, :h, :w].permute(1, 2, 0).numpy()


def test_16bit_png_keeps_its_mean_in_predict_and_through_a_shard(tmp_path, tokenizer):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    mean8 = _save_png16(img_dir / "g.png")
    # predict: a path and an already opened PIL image
    assert abs(np.asarray(to_pil(img_dir / "g.png")).mean() - mean8) <= 1.0
    assert abs(np.asarray(to_pil(Image.open(img_dir / "g.png"))).mean() - mean8) <= 1.0
    # convert → read → decoded sample and decoded training image
    ann = _coco(str(tmp_path), "g.png", W16, H16, [[2, 2, 20, 20]])
    out = str(tmp_path / "shards")
    convert_coco(ann, str(img_dir), out, "train", num_workers=1, progress=False)
    (sample,) = list(iter_samples(out, "train"))
    assert abs(np.asarray(sample.image).mean() - mean8) <= 1.0
    assert abs(_training_image(out, tokenizer, H16).mean() - mean8) <= 1.0


def test_exif_rotated_jpeg_is_upright_in_every_path(tmp_path, tokenizer):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    upright = _exif_jpeg(img_dir / "r.jpg")
    assert upright.shape == (40, 20, 3) and upright[5, 10, 0] > 200 and upright[35, 10, 2] > 200  # red on top

    assert np.array_equal(np.asarray(to_pil(img_dir / "r.jpg")), upright)
    assert np.array_equal(np.asarray(to_pil(Image.open(img_dir / "r.jpg"))), upright)
    assert np.array_equal(np.asarray(open_rgb((img_dir / "r.jpg").read_bytes())), upright)

    # the annotation is made on the upright 20x40 image: the red half is the box [0, 0, 20, 20]
    ann = _coco(str(tmp_path), "r.jpg", 20, 40, [[0, 0, 20, 20]])
    out = str(tmp_path / "shards")
    convert_coco(ann, str(img_dir), out, "train", num_workers=1, progress=False)
    (sample,) = list(iter_samples(out, "train"))
    assert np.array_equal(np.asarray(sample.image), upright)
    assert sample.boxes.tolist() == [[0.0, 0.0, 20.0, 20.0]]
    assert np.array_equal(_training_image(out, tokenizer, 20), upright)

    # the pseudo-label job's reader decodes the caption image the same way (and records the upright size)
    from glip_pl.label.config import LabelConfig
    from glip_pl.label.reader import CaptionShardReader

    reader = CaptionShardReader([], [], LabelConfig(teacher="t", input="i", output="o", min_size=0), tokenizer, 256)
    rec, t, size, reason, _ = reader._decode({"json": json.dumps({"id": "r", "caption": "a red half"}).encode(),
                                              "jpg": (img_dir / "r.jpg").read_bytes()})
    assert reason is None and size == (40, 20) and (rec["width"], rec["height"]) == (20, 40)
    assert np.array_equal(t.permute(1, 2, 0).numpy(), upright)


def test_converters_record_the_upright_size(tmp_path, make_image):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    _exif_jpeg(img_dir / "r.jpg")
    data = (img_dir / "r.jpg").read_bytes()
    # no width/height given: the writer fills in the upright size
    rec = {"id": "a", "source": "t", "kind": "detection", "boxes": [[0.0, 0.0, 20.0, 40.0]], "category_ids": [1]}
    write_samples(str(tmp_path / "mem"), "train", [{"json": rec, "image": data, "ext": "jpg"}], source="t",
                  kind="detection", num_workers=1, progress=False)
    (sample,) = list(iter_samples(str(tmp_path / "mem"), "train"))
    assert (sample.width, sample.height) == (20, 40) and sample.image.size == (20, 40)
    assert read_index(str(tmp_path / "mem"))["splits"]["train"]["count"] == 1
    # an annotation of the stored (sideways) pixels no longer matches: one error that says why
    ann = _coco(str(tmp_path), "r.jpg", 40, 20, [[0, 0, 20, 20]])
    with pytest.raises(ConversionError, match="image_size_mismatch") as e:
        convert_coco(ann, str(img_dir), str(tmp_path / "bad"), "train", num_workers=1, progress=False)
    assert "EXIF orientation" in str(e.value) and "r.jpg" in str(e.value)


def _mode_image(mode):
    if mode in ("I;16", "I;16B"):
        a, _ = _gradient16()
        dtype = "<u2" if mode == "I;16" else ">u2"
        return Image.frombytes(mode, (W16, H16), a.astype(dtype).tobytes()), a.mean() / 257.0
    if mode == "I":
        a, _ = _gradient16()
        return Image.fromarray(a.astype(np.int32), "I"), a.mean() / 257.0
    if mode == "F":
        a, _ = _gradient16()
        return Image.fromarray(a.astype(np.float32) / 65535.0, "F"), a.mean() / 257.0
    if mode == "LA":  # opaque grey 100 on the left half, fully transparent on the right: white there
        im = Image.new("LA", (W16, H16), (0, 0))
        im.paste((100, 255), (0, 0, W16 // 2, H16))
        return im, (100 + 255) / 2
    if mode == "P":  # palette index 0 is the transparent colour (black); index 1 is opaque grey 50
        im = Image.new("P", (W16, H16), 0)
        im.putpalette([0, 0, 0, 50, 50, 50] + [0] * 762)
        im.paste(1, (0, 0, W16 // 2, H16))
        im.info["transparency"] = 0
        return im, (50 + 255) / 2
    if mode == "CMYK":  # no ink: white
        return Image.new("CMYK", (W16, H16), (0, 0, 0, 0)), 255.0
    if mode == "1":
        im = Image.new("1", (W16, H16), 0)
        im.paste(1, (0, 0, W16 // 2, H16))
        return im, 127.5
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F", "LA", "P", "CMYK", "1"])
def test_every_mode_becomes_8bit_rgb_with_its_brightness(mode):
    im, mean8 = _mode_image(mode)
    out = to_rgb(im)
    assert out.mode == "RGB" and out.size == im.size
    assert abs(np.asarray(out, dtype=np.float64).mean() - mean8) <= 1.0, mode


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_files_decode_to_their_mean(fmt):
    a, mean8 = _gradient16()
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    assert abs(np.asarray(open_rgb(buf.getvalue())).mean() - mean8) <= 1.0
