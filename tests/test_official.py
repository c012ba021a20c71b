"""Official GLIP checkpoints ⇄ glip_pl: import with zero missing/unexpected keys for GLIP-T, GLIP-T(A) and GLIP-L
(names and shapes from the reference listings), bit-exact export round trip, safe loading, clear errors, the
official conventions under ``official_compat=True`` checked on hand-made inputs, and stable outputs of an
imported model across save/load."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.imports import imported_after
from official_listing import read_listing

from glip_pl.checkpoints import CheckpointError, load_glip_checkpoint
from glip_pl.checkpoints.official import (
    export_official,
    glip_to_official,
    import_official,
    load_official_state_dict,
    official_to_glip,
)
from glip_pl.checkpoints.official_names import official_cell_anchors, relative_position_index
from glip_pl.model.glip import BGR255_MEAN, BGR255_STD, build_glip

LISTINGS = {"glip_t": "glip_t_state_dict.txt", "glip_t_a": "glip_t_a_state_dict.txt", "glip_l": "glip_l_state_dict.txt"}
# reference §1.5.4: official cell anchors (TO_REMOVE=1) of P3..P7
REF_CELL_ANCHORS = [[-28, -28, 35, 35], [-56, -56, 71, 71], [-112, -112, 143, 143], [-224, -224, 287, 287],
                    [-448, -448, 575, 575]]
WINDOW = {"glip_t": 7, "glip_t_a": 7, "glip_l": 12}
NOT_ROUND_TRIPPED = "rpn.head.cls_logits."  # unused by GLIP, left out of glip_pl, re-created on export


POOL_SIZE = 1 << 22


def random_official(preset: str, seed: int = 0, device=None) -> dict:
    """A state dict with exactly the official names and shapes; pseudo-random params, the official buffers.

    To keep 150–430M-parameter checkpoints cheap to make, save and load on 2 CPU cores, every parameter is a
    (possibly overlapping) strided view into one 4M-value random pool, each at its own offset: the values still
    differ from key to key (a swapped or mis-mapped tensor changes them), and torch.save stores the pool once.
    """
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL_SIZE, generator=g) * 0.02
    out, seen = {}, set()
    for i, (k, shape) in enumerate(read_listing(LISTINGS[preset]).items()):
        if k.endswith("relative_position_index"):
            out[k] = relative_position_index(WINDOW[preset])
            assert list(out[k].shape) == shape
        elif k.startswith("rpn.anchor_generator.cell_anchors."):
            out[k] = torch.tensor([REF_CELL_ANCHORS[int(k.rsplit(".", 1)[1])]], dtype=torch.float32)
        elif device == "meta":
            out[k] = torch.empty(shape, device="meta")
        else:
            stride = [math.prod(shape[d + 1:]) for d in range(len(shape))]
            if math.prod(shape) > POOL_SIZE // 2:  # only the word embeddings: rows overlap, 13 apart
                stride[0] = 13
            span = 1 + sum((n - 1) * st for n, st in zip(shape, stride))
            offset = (i * 7919 + 1) % (POOL_SIZE - span)
            assert (offset, tuple(shape)) not in seen
            seen.add((offset, tuple(shape)))
            out[k] = pool.as_strided(shape, stride, offset)
    return out


def official_file(path, sd: dict, **extra) -> None:
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "iteration": 7, **extra}, path)


def assert_bit_exact(original: dict, exported: dict) -> None:
    assert set(exported) == set(original), set(exported) ^ set(original)
    for k, v in original.items():
        w = exported[k]
        assert tuple(w.shape) == tuple(v.shape), k
        if k.startswith(NOT_ROUND_TRIPPED):
            continue
        assert w.dtype == v.dtype and torch.equal(w, v), k


# ----------------------------------------------------------------------------------------- presets


@pytest.fixture(scope="module")
def glip_t_a_files(tmp_path_factory):
    """A random official GLIP-T(A) file and its import (shared by the round-trip and the output tests)."""
    d = tmp_path_factory.mktemp("glip_t_a")
    sd = random_official("glip_t_a", seed=3)
    src, ckpt = d / "glip_a.pth", d / "glip_a.ckpt"
    official_file(src, sd)
    report = import_official(src, ckpt, "glip_t_a")
    return sd, src, ckpt, report


def test_glip_t_a_file_round_trip_bit_exact(glip_t_a_files, tmp_path):
    """GLIP-T(A) through real files: import (zero missing/unexpected), export, compare bit for bit."""
    sd, _, ckpt, report = glip_t_a_files
    assert report.ok and not report.missing and not report.unexpected and not report.mismatched
    assert len(report.mapped) == 522 and len(report.mapped) + len(report.ignored) == len(sd)
    # T(A): official dyhead_tower.{k} is ours 3k+2
    assert ("rpn.head.dyhead_tower.5.offset.weight", "head.dyhead_tower.17.offset.weight") in report.mapped
    out = tmp_path / "back.pth"
    export_official(ckpt, out)
    back = torch.load(out, map_location="cpu", weights_only=True)
    assert set(back) == {"model"} and all(k.startswith("module.") for k in back["model"])
    back = {k[len("module."):]: v for k, v in back["model"].items()}
    assert_bit_exact(sd, back)
    assert list(back) == list(sd)  # also in the official order


def test_glip_t_round_trip_bit_exact():
    """GLIP-T (232M) in memory: every official key is mapped or ignored with a reason, and comes back exactly."""
    sd = random_official("glip_t", seed=1)
    glip_sd, report = official_to_glip({"module." + k: v for k, v in sd.items()}, "glip_t")
    assert report.ok and len(report.mapped) == 726
    reasons = {r for _, r in report.ignored}
    assert reasons == {"relative_position_index", "cls_logits", "cell_anchors"}
    assert glip_sd["backbone.body.swin.layers_1.downsample.reduction.weight"] is sd[
        "backbone.body.layers.0.downsample.reduction.weight"]
    assert glip_sd["backbone.fpn.inner_blocks.0.0.weight"] is sd["backbone.fpn.fpn_inner2.weight"]
    assert glip_sd["head.dyhead_tower.16.output.dense.weight"] is sd["rpn.head.dyhead_tower.16.output.dense.weight"]
    back = glip_to_official(glip_sd, "glip_t")
    assert_bit_exact(sd, back)
    assert list(back) == list(sd)  # same order as the official listing
    for k, v in sd.items():
        if not k.startswith(NOT_ROUND_TRIPPED) and v.is_floating_point() and "cell_anchors" not in k:
            assert back[k] is v, k  # passed through untouched


def test_glip_l_names_shapes_and_pass_through_on_meta():
    """GLIP-L (430M) structurally on meta: zero missing/unexpected both ways; tensors pass through untouched."""
    sd = random_official("glip_l", device="meta")
    glip_sd, report = official_to_glip(sd, "glip_l")
    assert report.ok and len(report.mapped) == 990
    assert sum(r == "relative_position_index" for _, r in report.ignored) == 24
    back = glip_to_official(glip_sd, "glip_l")
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert tuple(back[k].shape) == tuple(v.shape), k
        if v.device.type == "meta" and not k.startswith(NOT_ROUND_TRIPPED):
            assert back[k] is v, k
    # the buffers export re-creates are the ones of the reference (window 12 for L)
    rpi = back["backbone.body.layers.3.blocks.1.attn.relative_position_index"]
    assert torch.equal(rpi, relative_position_index(12))


def test_missing_unexpected_and_wrong_preset_raise_with_the_list():
    sd = random_official("glip_t_a", device="meta")
    broken = dict(sd)
    del broken["rpn.head.bias0"]
    broken["rpn.head.something_new"] = torch.empty(3, device="meta")
    with pytest.raises(CheckpointError) as e:
        official_to_glip(broken, "glip_t_a")
    msg = str(e.value)
    assert "head.bias0" in msg and "rpn.head.something_new" in msg and "MISSING" in msg and "UNEXPECTED" in msg
    with pytest.raises(CheckpointError, match="SHAPE MISMATCH|UNEXPECTED"):
        official_to_glip(sd, "glip_t")  # a T(A) checkpoint is not a GLIP-T one
    with pytest.raises(CheckpointError, match="SHAPE MISMATCH"):
        official_to_glip(random_official("glip_t", device="meta"), "glip_l")
    _, rep = official_to_glip(broken, "glip_t_a", strict=False)
    assert rep.missing == ["head.bias0"] and rep.unexpected == ["rpn.head.something_new"]


def test_known_extras_are_ignored_with_reason_and_bad_buffers_refused():
    sd = random_official("glip_t_a", device="meta")
    sd["language_backbone.body.model.embeddings.position_ids"] = torch.arange(512).view(1, 512)
    sd["language_backbone.body.model.pooler.dense.weight"] = torch.empty(768, 768, device="meta")
    sd["language_backbone.body.model.pooler.dense.bias"] = torch.empty(768, device="meta")
    _, report = official_to_glip(sd, "glip_t_a")
    reasons = dict(report.ignored)
    assert reasons["language_backbone.body.model.embeddings.position_ids"] == "position_ids"
    assert reasons["language_backbone.body.model.pooler.dense.weight"] == "pooler"
    assert "pooler" in report.summary() and "cls_logits" in report.summary()
    for key, bad in [("rpn.anchor_generator.cell_anchors.0", torch.tensor([[-32.0, -32.0, 32.0, 32.0]])),
                     ("backbone.body.layers.2.blocks.3.attn.relative_position_index", relative_position_index(12)),
                     ("language_backbone.body.model.embeddings.position_ids", torch.arange(512).flip(0).view(1, 512))]:
        wrong = dict(sd)
        wrong[key] = bad
        with pytest.raises(CheckpointError, match="INVALID"):
            official_to_glip(wrong, "glip_t_a")


# ----------------------------------------------------------------------------------------- files, CLI


@pytest.fixture(scope="module")
def tiny_official():
    """A small official-layout state dict (the ``tiny`` preset through the export rules)."""
    torch.manual_seed(0)
    model = build_glip("tiny", official_compat=True)
    return glip_to_official(model.state_dict(), "tiny")


class NotATensor:  # a pickled Python object: weights_only refuses it
    def __init__(self):
        self.x = 1


def test_loading_is_weights_only_and_refuses_pickled_objects(tmp_path, tiny_official):
    path = tmp_path / "unsafe.pth"
    official_file(path, tiny_official, cfg=NotATensor())
    with pytest.raises(CheckpointError, match="refuses to unpickle arbitrary objects") as e:
        load_official_state_dict(path)
    assert "weights_only" in str(e.value) and str(path) in str(e.value)
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        import_official(path, tmp_path / "x.ckpt", "tiny")
    assert not (tmp_path / "x.ckpt").exists()


def test_layouts_ema_module_prefix_and_bare(tmp_path, tiny_official):
    ema = {k: v + 1 if v.is_floating_point() and "cell_anchors" not in k else v for k, v in tiny_official.items()}
    full = tmp_path / "full.pth"
    official_file(full, tiny_official, model_ema={"module." + k: v for k, v in ema.items()},
                  optimizer={"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
                  scheduler={"last_epoch": 3})
    a = load_official_state_dict(full)
    b = load_official_state_dict(full, use_ema=True)
    k = "rpn.head.bias0"
    assert torch.equal(a[k], tiny_official[k]) and torch.equal(b[k], ema[k])
    bare = tmp_path / "bare.pth"
    torch.save(tiny_official, bare)  # no "model", no prefix
    assert set(load_official_state_dict(bare)) == set(tiny_official)
    with pytest.raises(CheckpointError, match="model_ema"):
        load_official_state_dict(bare, use_ema=True)
    import_official(full, tmp_path / "ema.ckpt", "tiny", use_ema=True)
    model = load_glip_checkpoint(tmp_path / "ema.ckpt")
    assert torch.equal(model.head.bias0.detach(), ema[k])


def test_cli_import_export(tmp_path, tiny_official, capsys):
    from glip_pl.cli import main

    src, ckpt, out = tmp_path / "o.pth", tmp_path / "g.ckpt", tmp_path / "back.pth"
    official_file(src, tiny_official)
    assert main(["import-official", str(src), str(ckpt), "--preset", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "0 missing, 0 unexpected" in text and "cls_logits" in text
    assert main(["export-official", str(ckpt), str(out)]) == 0
    back = torch.load(out, weights_only=True)["model"]
    assert_bit_exact(tiny_official, {k[len("module."):]: v for k, v in back.items()})
    # a wrong preset is an error with the report, exit code 2
    assert main(["import-official", str(src), str(tmp_path / "bad.ckpt"), "--preset", "glip_t_a"]) == 2
    assert "does not match the glip_pl preset 'glip_t_a'" in capsys.readouterr().err


def test_export_from_a_lightning_checkpoint(tmp_path, tiny_official):
    """GLIPLitModule checkpoints (``model.`` prefixes, preset + model_options in hyper_parameters) export too."""
    glip_sd, _ = official_to_glip(tiny_official, "tiny")
    lit = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in glip_sd.items()}, "global_step": 3,
                "hyper_parameters": {"preset": "tiny", "model_options": {"official_compat": True}}}, lit)
    official = export_official(lit, tmp_path / "o.pth")
    assert_bit_exact(tiny_official, official)
    model = load_glip_checkpoint(lit)
    assert model.cfg.official_compat and torch.equal(model.head.bias0.detach(), tiny_official["rpn.head.bias0"])


def test_glip_checkpoint_other_preset_or_shape_is_a_clear_error(tmp_path, tiny_official):
    src, ckpt = tmp_path / "o.pth", tmp_path / "g.ckpt"
    official_file(src, tiny_official)
    import_official(src, ckpt, "tiny")
    obj = torch.load(ckpt, weights_only=True)
    assert obj["format"] == "glip_pl" and obj["preset"] == "tiny" and obj["config"]["official_compat"] is True
    with pytest.raises(CheckpointError, match="preset 'tiny', but 'glip_t' was asked"):
        load_glip_checkpoint(ckpt, preset="glip_t")
    obj["state_dict"]["head.bias_lang"] = torch.zeros(5)
    torch.save(obj, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"head\.bias_lang: checkpoint \(5,\) vs model \(64,\)"):
        load_glip_checkpoint(tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="official GLIP checkpoint; convert it first"):
        load_glip_checkpoint(src)


# ----------------------------------------------------------------------------------------- conventions


def test_bgr255_normalisation_matches_direct_computation():
    model = build_glip("tiny", official_compat=True)
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (1, 3, 40, 50), generator=g, dtype=torch.uint8)
    x = model.normalize(img, torch.tensor([[40, 50]]))
    # official: ToTensor (÷255) → [[2,1,0]] ×255 → Normalize(mean, std) in BGR order; zero padding to 32
    bgr = img[0, [2, 1, 0]].float() / 255.0 * 255.0
    direct = (bgr - torch.tensor(BGR255_MEAN).view(3, 1, 1)) / torch.tensor(BGR255_STD).view(3, 1, 1)
    assert x.shape == (1, 3, 64, 64)
    assert torch.equal(x[0, :, :40, :50], direct)
    assert torch.all(x[0, :, 40:] == 0) and torch.all(x[0, :, :, 50:] == 0)
    # a hand-made pixel: pure red RGB (255, 0, 0) → B=0, G=0, R=255
    red = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    red[:, 0] = 255
    px = model.normalize(red, torch.tensor([[32, 32]]))[0, :, 0, 0]
    want = torch.tensor([(0 - 103.530) / 57.375, (0 - 116.280) / 57.120, (255 - 123.675) / 58.395])
    assert torch.allclose(px, want, atol=1e-6)


def test_plus_one_anchors_equal_the_official_cell_anchors():
    from glip_pl.model.anchors import make_anchors

    cfg = build_glip("tiny", official_compat=True).cfg
    assert [a[0].tolist() for a in official_cell_anchors(cfg)] == REF_CELL_ANCHORS
    sizes = [(4, 6), (2, 3), (1, 2), (1, 1), (1, 1)]
    anchors = make_anchors(sizes, cfg.strides, cfg.anchor_scale, plus_one=True)
    start = 0
    for (h, w), stride, cell in zip(sizes, cfg.strides, REF_CELL_ANCHORS):
        for y in range(h):
            for x in range(w):  # official: cell anchor + (x·stride, y·stride), row-major per level
                want = [cell[0] + x * stride, cell[1] + y * stride, cell[2] + x * stride, cell[3] + y * stride]
                assert anchors[start + y * w + x].tolist() == want
        start += h * w


def test_plus_one_box_coder_iou_and_nms():
    from glip_pl.model.box_coder import BoxCoder, box_iou, nms

    coder = BoxCoder(plus_one=True)
    anchor = torch.tensor([[0.0, 0.0, 9.0, 19.0]])  # w 10, h 20, centre (5, 10) under the +1 convention
    gt = torch.tensor([[2.0, 4.0, 21.0, 13.0]])  # w 20, h 10, centre (12, 9)
    want = torch.tensor([[10 * (12 - 5) / 10, 10 * (9 - 10) / 20, 5 * math.log(20 / 10), 5 * math.log(10 / 20)]])
    assert torch.allclose(coder.encode(gt, anchor), want, atol=1e-6)
    # official decode: x2 = ctr + 0.5·w − 1
    assert torch.allclose(coder.decode(want, anchor), gt, atol=1e-5)
    a, b = torch.tensor([[0.0, 0.0, 9.0, 9.0]]), torch.tensor([[5.0, 0.0, 14.0, 9.0]])
    assert torch.allclose(box_iou(a, b, plus_one=True), torch.tensor([[50 / 150]]))  # (5·10) / (100+100−50)
    assert torch.allclose(box_iou(a, b, plus_one=False), torch.tensor([[36 / 126]]))
    # NMS at 0.3: suppressed under +1 (IoU 1/3), kept without (IoU 0.286)
    boxes, scores, labels = torch.cat([a, b]), torch.tensor([0.9, 0.8]), torch.zeros(2, dtype=torch.long)
    assert nms(boxes, scores, labels, 0.3, plus_one=True).tolist() == [0]
    assert nms(boxes, scores, labels, 0.3, plus_one=False).tolist() == [0, 1]


def test_deformable_offset_reuse_is_the_flat_memory_reinterpretation():
    from glip_pl.model.dyhead import DyHeadBlock, offsets_for_coarser_level

    offset = torch.arange(2 * 18 * 5 * 7, dtype=torch.float32).view(2, 18, 5, 7)  # level l: 5×7
    mask = torch.arange(2 * 9 * 5 * 7, dtype=torch.float32).view(2, 9, 5, 7)
    ho, wo = 3, 4  # level l+1
    off, msk = offsets_for_coarser_level(offset, mask, (ho, wo), official_compat=True)
    for b in range(2):
        for c in range(18):
            for y in range(ho):
                for x in range(wo):  # the CUDA kernel reads offset_b[c·Ho·Wo + y·Wo + x]
                    assert off[b, c, y, x] == offset[b].flatten()[c * ho * wo + y * wo + x]
        assert msk[b, 8, 2, 3] == mask[b].flatten()[8 * ho * wo + 2 * wo + 3]
    model = build_glip("tiny", official_compat=True)
    assert all(m.official_compat for m in model.modules() if isinstance(m, DyHeadBlock))


# ----------------------------------------------------------------------------------------- outputs


def test_imported_glip_t_a_outputs_stable_across_save_load(glip_t_a_files, tmp_path):
    """Random official GLIP-T(A) → glip_pl → model; the outputs on a fixed image and caption are identical after
    export → re-import → a fresh model."""
    _, _, ckpt, _ = glip_t_a_files
    model = load_glip_checkpoint(ckpt)
    assert not model.training and model.cfg.official_compat and model.box_coder.plus_one
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 64, 64), generator=g, dtype=torch.uint8)
    sizes = torch.tensor([[64, 64]])
    text, _ = model.tokenize(["a cat. a remote control"])
    with torch.no_grad():
        out1 = model(image, sizes, text)
    assert torch.isfinite(out1.logits).all() and out1.logits.shape[-1] == text.length
    assert out1.anchors[0].tolist() == REF_CELL_ANCHORS[0]  # +1 anchors in the running model
    del model
    export_official(ckpt, tmp_path / "back.pth")
    import_official(tmp_path / "back.pth", tmp_path / "again.ckpt", "glip_t_a")
    model2 = load_glip_checkpoint(tmp_path / "again.ckpt", preset="glip_t_a")
    with torch.no_grad():
        out2 = model2(image, sizes, text)
    for name in ("logits", "box_regression", "centerness", "anchors"):
        assert torch.equal(getattr(out1, name), getattr(out2, name)), name


def test_official_module_imports_no_lightning():
    code = ("import glip_pl.checkpoints.official, glip_pl.checkpoints.cli_official, glip_pl.checkpoints.consolidate, "
            "glip_pl.checkpoints.cli_consolidate")
    assert imported_after(code) == []
