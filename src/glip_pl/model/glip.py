"""The GLIP detector: image encoder + text encoder + VL-DyHead, with its criterion and post-processor.

GLIP §3 / reference §1: the image never sees the text before the head, so its features can serve many prompts.
Plain PyTorch: no Lightning, torch.distributed, W&B or DeepSpeed here.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .anchors import make_anchors
from .backbone import ImageBackbone
from .box_coder import BoxCoder
from .head import GLIPHead
from .language import TextEncoder, build_tokenizer, tokenize
from .losses import GroundingCriterion
from .postprocess import postprocess
from .presets import GLIPConfig
from .prompt_tuning import PromptEmbedding, freeze_all_but_prompt
from .prompts import Prompt, build_detection_prompt, phrases_from_caption, spans_to_token_map
from .types import Detections, GLIPInputError, GroundingOutputs, Targets, TextInputs

# ImageNet statistics; the official model reads BGR 0–255 (reference §1.1), the same numbers ×255.
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
BGR255_MEAN = (103.530, 116.280, 123.675)
BGR255_STD = (57.375, 57.120, 58.395)
SIZE_DIVISIBILITY = 32


class GLIP(nn.Module):
    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = ImageBackbone(cfg.swin, cfg.channels, cfg.dropblock, cfg.dropblock_prob, cfg.dropblock_size,
                                      official_compat=cfg.official_compat)
        if cfg.checkpoint_backbone:
            self.backbone.body.set_grad_checkpointing(True)
        self.language_backbone = TextEncoder(cfg.text, gradient_checkpointing=cfg.checkpoint_text)
        text_dim = self.language_backbone.hidden_size
        self.head = GLIPHead(
            channels=cfg.channels, text_dim=text_dim, num_blocks=cfg.num_blocks, num_levels=len(cfg.strides),
            fusion=cfg.fusion, fusion_embed_dim=cfg.fusion_embed_dim, fusion_heads=cfg.fusion_heads,
            fusion_dropout=cfg.fusion_dropout, text_layer_heads=cfg.text_layer_heads,
            text_layer_intermediate=cfg.text_layer_intermediate, use_fused_text=cfg.use_fused_text,
            groupnorm_groups=cfg.groupnorm_groups, official_compat=cfg.official_compat, use_sdpa=cfg.use_sdpa,
            deform_conv=cfg.deform_conv,
            checkpoint_fusion=cfg.checkpoint_fusion, checkpoint_text=cfg.checkpoint_text,
            checkpoint_dyhead=cfg.checkpoint_dyhead,
        )
        self.box_coder = BoxCoder(plus_one=cfg.official_compat)
        self.criterion = GroundingCriterion(self.box_coder, topk=cfg.topk, plus_one=cfg.official_compat)
        if cfg.official_compat:
            mean, std = torch.tensor(BGR255_MEAN), torch.tensor(BGR255_STD)
        else:
            mean, std = torch.tensor(RGB_MEAN), torch.tensor(RGB_STD)
        self.register_buffer("pixel_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.view(1, 3, 1, 1), persistent=False)
        self._tokenizer = None
        self.prompt = PromptEmbedding(cfg.max_text_len, text_dim) if cfg.prompt_tuning else None
        if cfg.prompt_tuning:
            freeze_all_but_prompt(self)

    @property
    def optional_state_keys(self) -> tuple:
        """Keys a checkpoint may lack: the zero-initialised prompt when starting prompt tuning from a detector."""
        return ("prompt.weight",) if self.prompt is not None else ()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.cfg.tokenizer)
        return self._tokenizer

    def normalize(self, images: Tensor, image_sizes: Tensor) -> Tensor:
        """uint8 or [0,1] float RGB (B,3,H,W) → normalised float; padding (outside image_sizes) stays 0."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise GLIPInputError(f"images must be (B, 3, H, W); got shape {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if self.cfg.official_compat:  # RGB [0,1] → BGR [0,255]
            x = x.flip(1) * 255.0
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        rows = torch.arange(h, device=x.device).view(1, h, 1) < image_sizes[:, 0].view(-1, 1, 1).to(x.device)
        cols = torch.arange(w, device=x.device).view(1, 1, w) < image_sizes[:, 1].view(-1, 1, 1).to(x.device)
        x = x * (rows & cols).unsqueeze(1).to(x.dtype)
        ph, pw = (-h) % SIZE_DIVISIBILITY, (-w) % SIZE_DIVISIBILITY
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return x

    @staticmethod
    def batch_images(images: Sequence[Tensor]):
        """Pad a list of (3,H,W) images (all uint8, or all float in [0,1]) into (B,3,Hp,Wp) + sizes (B,2)."""
        if len(images) == 0:
            raise GLIPInputError("no images given")
        first = images[0]
        for i, im in enumerate(images):
            if not isinstance(im, Tensor) or im.dim() != 3:
                raise GLIPInputError(f"image #{i}: expected a (3, H, W) tensor, got {type(im).__name__} "
                                     f"{tuple(getattr(im, 'shape', ()))}")
            if im.shape[0] != 3:
                raise GLIPInputError(f"image #{i} has {im.shape[0]} channels; every image must be RGB (3 channels)")
            if im.dtype != first.dtype:
                raise GLIPInputError(f"image #{i} is {im.dtype} but image #0 is {first.dtype}; give one dtype")
        hs = [im.shape[1] for im in images]
        ws = [im.shape[2] for im in images]
        H = -(-max(hs) // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
        W = -(-max(ws) // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
        out = first.new_zeros((len(images), 3, H, W))
        for i, im in enumerate(images):
            out[i, :, : im.shape[1], : im.shape[2]] = im
        return out, torch.tensor([[h, w] for h, w in zip(hs, ws)], dtype=torch.long)

    def tokenize(self, captions: Sequence[str], pad_to: Optional[int] = None):
        return tokenize(self.tokenizer, captions, max_length=self.cfg.max_text_len, pad_to=pad_to)

    def encode_image(self, images: Tensor, image_sizes: Tensor) -> list:
        """Normalise and run Swin+FPN once; the features can be reused for many prompts (LVIS chunks)."""
        # Normalise in fp32, then hand the backbone its weights' dtype: a model cast to bf16/fp16 (DeepSpeed's
        # bf16 mode casts the weights and runs no autocast) would otherwise meet an fp32 image in its first conv.
        return self.backbone(self.normalize(images, image_sizes).to(weight_dtype(self.backbone)))

    def encode_text(self, text: TextInputs) -> Tensor:
        """Text features (B,T,D); the tuned prompt is added here, before any text-feature cache of chunked eval."""
        features = self.language_backbone(text)
        return self.prompt(features) if self.prompt is not None else features

    def forward_head(self, features: list, text: TextInputs, text_features: Optional[Tensor] = None) -> GroundingOutputs:
        mask = text.attention_mask.bool()
        if text_features is None:
            text_features = self.encode_text(text)
        if features[0].shape[0] != text_features.shape[0]:
            raise GLIPInputError(f"{features[0].shape[0]} images but {text_features.shape[0]} prompts")
        logits, box, ctr, sizes = self.head(features, text_features, mask)
        anchors = make_anchors(sizes, self.cfg.strides, self.cfg.anchor_scale, plus_one=self.cfg.official_compat,
                               device=box.device, dtype=torch.float32)
        return GroundingOutputs(logits=logits, box_regression=box, centerness=ctr, anchors=anchors,
                                level_sizes=sizes, text_mask=mask)

    def forward(self, images: Tensor, image_sizes: Tensor, text: TextInputs) -> GroundingOutputs:
        """images (B,3,H,W) uint8/[0,1] RGB padded at bottom/right; image_sizes (B,2) content (h, w)."""
        if images.shape[0] != text.input_ids.shape[0]:
            raise GLIPInputError(f"{images.shape[0]} images but {text.input_ids.shape[0]} prompts")
        return self.forward_head(self.encode_image(images, image_sizes), text)

    def loss(self, outputs: GroundingOutputs, targets: Targets) -> dict:
        """Named, unweighted loss terms; ``self.criterion.total(terms)`` weights and sums them."""
        return self.criterion(outputs, targets.with_text_length(outputs.logits.shape[-1]))

    @torch.no_grad()
    def predict(self, images: Sequence[Tensor], prompts: Sequence, orig_sizes: Optional[Sequence] = None,
                **post) -> list:
        """Detections of each prompt (a caption, a list of class names or a ``Prompt``) in each (3,H,W) RGB image."""
        if len(images) != len(prompts):
            raise GLIPInputError(f"{len(images)} images but {len(prompts)} prompts")
        batch, sizes = self.batch_images(images)
        prompts = [self.as_prompt(p) for p in prompts]
        text, offsets = self.tokenize([p.caption for p in prompts])
        T = text.length
        maps = [spans_to_token_map(p.caption, p.spans, off, T, where=f"prompt #{i}")
                for i, (p, off) in enumerate(zip(prompts, offsets))]
        dev = self.pixel_mean.device
        out = self(batch.to(dev), sizes.to(dev), text.to(dev))
        return self.postprocess(out, maps, sizes.tolist(), orig_sizes or sizes.tolist(),
                                phrases=[p.names for p in prompts], **post)

    @staticmethod
    def as_prompt(p) -> Prompt:
        if isinstance(p, Prompt):
            return p
        if isinstance(p, str):
            return phrases_from_caption(p)
        if isinstance(p, (list, tuple)):
            return build_detection_prompt(p)
        raise GLIPInputError(f"a prompt must be a caption, a list of names or a Prompt; got {type(p).__name__}")

    def postprocess(self, outputs: GroundingOutputs, token_maps: list, image_sizes, orig_sizes, **kw) -> list:
        c = self.cfg
        opts = dict(score_thresh=c.score_thresh, pre_nms_top_n=c.pre_nms_top_n, nms_thresh=c.nms_thresh,
                    detections_per_img=c.detections_per_img)
        opts.update(kw)
        return postprocess(outputs, [m.to(outputs.logits.device) for m in token_maps],
                           [tuple(map(int, s)) for s in image_sizes], [tuple(map(int, s)) for s in orig_sizes],
                           self.box_coder, plus_one=c.official_compat, **opts)


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype its inputs must have when the weights were cast (``model.to(torch.bfloat16)``, DeepSpeed bf16);
    fp32 under autocast, whose weights stay fp32."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def build_glip(preset: str = "tiny", **overrides) -> GLIP:
    """A GLIP from a preset name plus overrides (``swin__pretrained=...`` for nested options)."""
    from .presets import get_config

    return GLIP(get_config(preset, **overrides))


def make_targets(boxes: Sequence[Tensor], positive_maps: Sequence[Tensor], num_tokens: int) -> Targets:
    """Pad per-image boxes (M_b,4) and positive maps (M_b,T_b) into a ``Targets``; validates the boxes."""
    B = len(boxes)
    M = max([int(b.shape[0]) for b in boxes] + [1])
    out_boxes = torch.zeros(B, M, 4)
    valid = torch.zeros(B, M, dtype=torch.bool)
    pmap = torch.zeros(B, M, num_tokens)
    for i, (b, pm) in enumerate(zip(boxes, positive_maps)):
        b = torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4)
        if not torch.isfinite(b).all():
            raise GLIPInputError(f"image #{i}: boxes contain NaN/Inf")
        bad = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
        if bad.any():
            j = int(bad.nonzero()[0])
            raise GLIPInputError(f"image #{i}, box #{j}: x2 < x1 or y2 < y1 in {b[j].tolist()} (boxes are x1,y1,x2,y2)")
        if pm.shape[0] != b.shape[0]:
            raise GLIPInputError(f"image #{i}: {b.shape[0]} boxes but {pm.shape[0]} positive-map rows")
        n = b.shape[0]
        out_boxes[i, :n] = b
        valid[i, :n] = True
        pmap[i, :n, : min(pm.shape[1], num_tokens)] = pm[:, :num_tokens].float()
    return Targets(boxes=out_boxes, valid=valid, positive_map=pmap)


def config_dict(model: GLIP) -> dict:
    return asdict(model.cfg)
