"""FLOPs of one training step (forward + backward) of the real presets at the paper's input size, without running
them: the image backbone and the fusion head run on fake tensors (``torch._subclasses.FakeTensorMode``: shapes
only, no memory, no arithmetic) under ``torch.utils.flop_counter``; the text encoder (BERT, whose attention-mask
checks need real values) runs for real on CPU. Broken down by part: image backbone (Swin + FPN), text encoder,
fusion (the image-text cross-attention of every block) and the rest of the head (DyHead, extra text layers,
predictors and region-token scores).

Variants: text padded to 256 tokens (official) vs. the prompt's own length. The loss (ATSS assignment, focal and
GIoU terms: data-dependent, negligible FLOPs) is replaced by the sum of the head's outputs, so the backward runs
through every part as in training. Modulated deformable convolutions count as the dense 3x3 convolution they
replace (the sampling is not counted). Attention is counted in its plain form (what SDPA computes too).

    python benchmarks/count_flops.py                              # glip_t and glip_l, 800x1333, ~40-token prompt
    python benchmarks/count_flops.py --presets glip_t --size 800x1066 --prompt-tokens 100

Prints a table and writes json (default benchmarks/results/count_flops.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench_common import git_commit  # noqa: E402


def _deform(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    b, cout, ho, wo = out_shape
    return 2 * b * cout * ho * wo * weight_shape[1] * weight_shape[2] * weight_shape[3]


def _deform_backward(grad_shape, input_shape, weight_shape, *args, **kwargs) -> int:
    b, cout, ho, wo = grad_shape
    return 4 * b * cout * ho * wo * weight_shape[1] * weight_shape[2] * weight_shape[3]  # d input + d weight


def counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={torch.ops.torchvision.deform_conv2d: _deform,
                                                          torch.ops.torchvision._deform_conv2d_backward:
                                                              _deform_backward})


def count(model, mode: FakeTensorMode, h: int, w: int, batch: int, prompt_tokens: int, pad256: bool) -> dict:
    from glip_pl.model.prompts import build_detection_prompt

    names = [f"object {k}" for k in range(max(1, (prompt_tokens - 2) // 3))]
    prompt = build_detection_prompt(names)
    text, _ = model.tokenize([prompt.caption] * batch, pad_to=256 if pad256 else None)

    # text encoder: real, on CPU
    lang = counter()
    with lang:
        feats = model.encode_text(text)
        feats.sum().backward()
    text_flops = lang.get_total_flops()

    # image backbone + head: fake tensors (the mode that made their parameters fake)
    fake = counter()
    with mode, fake:
        images = torch.zeros(batch, 3, h, w)
        sizes = torch.tensor([[h, w]] * batch)
        visual = model.encode_image(images, sizes)
        tf = torch.zeros(batch, text.length, model.language_backbone.hidden_size, requires_grad=True)
        out = model.forward_head(visual, text, text_features=tf)
        (out.logits.sum() + out.box_regression.sum() + out.centerness.sum()).backward()
    flat = {n: sum(ops.values()) for n, ops in fake.get_flop_counts().items()}
    fusion = sum(v for n, v in flat.items() if re.fullmatch(r"GLIPHead\.dyhead_tower\.\d+\.b_attn", n))
    backbone, head = flat.get("ImageBackbone", 0), flat.get("GLIPHead", 0)
    total = text_flops + fake.get_total_flops()
    return {"text_len": int(text.length), "total": int(total), "backbone": int(backbone), "text": int(text_flops),
            "fusion": int(fusion), "head_rest": int(head - fusion),
            "other": int(total - backbone - text_flops - head)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["glip_t", "glip_l"])
    ap.add_argument("--size", default="800x1333", help="H or HxW")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=40)
    ap.add_argument("--out", default="benchmarks/results/count_flops.json")
    args = ap.parse_args(argv)
    hw = args.size.lower().split("x")
    h, w = int(hw[0]), int(hw[-1])

    from glip_pl.model import build_glip

    torch.__future__.set_overwrite_module_params_on_conversion(True)
    rows = []
    for preset in args.presets:
        torch.manual_seed(0)
        model = build_glip(preset, use_sdpa=False, dropblock=False).train()
        # the image side and the head become fake (the text encoder stays real: its mask checks read values)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        model.backbone._apply(mode.from_tensor)
        model.head._apply(mode.from_tensor)
        for pad in (True, False):
            r = count(model, mode, h, w, args.batch, args.prompt_tokens, pad)
            rows.append({"preset": preset, "variant": "official: pad 256" if pad else "longest prompt", **r})
            print(f"  {preset} {rows[-1]['variant']}: {r['total'] / args.batch / 1e12:.2f} TFLOP/image",
                  file=sys.stderr, flush=True)
        del model

    print(f"\ninput={h}x{w} batch={args.batch} prompt~{args.prompt_tokens} tokens, forward+backward, commit={git_commit()}")
    print(f"{'preset':7s} {'variant':18s} {'T':>4s} {'TFLOP/img':>9s} {'backbone':>9s} {'text':>6s} {'fusion':>7s} "
          f"{'head rest':>9s} {'fusion %':>8s}")
    for r in rows:
        b = args.batch * 1e12
        print(f"{r['preset']:7s} {r['variant']:18s} {r['text_len']:4d} {r['total'] / b:9.2f} {r['backbone'] / b:9.2f} "
              f"{r['text'] / b:6.2f} {r['fusion'] / b:7.2f} {r['head_rest'] / b:9.2f} {100 * r['fusion'] / r['total']:7.1f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/count_flops.py " + " ".join(argv or sys.argv[1:]),
                               "commit": git_commit(), "input": [h, w], "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
