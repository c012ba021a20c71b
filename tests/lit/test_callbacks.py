"""Callbacks: grad-norm logging and W&B validation images (predicted and true boxes with phrases), offline."""

from types import SimpleNamespace

import torch

from glip_pl.lit.callbacks import GradNormMonitor, ValidationImageLogger, validation_image_panels, wandb_boxes


class _Mod(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        self.logged = {}

    def log_dict(self, d, **kw):
        self.logged.update({k: float(v) for k, v in d.items()})


def test_grad_norm_is_the_total_2_norm_per_group_too():
    m = _Mod()
    m.b(m.a(torch.ones(3, 2))).sum().backward()
    opt = torch.optim.SGD([{"params": m.a.parameters(), "name": "a"}, {"params": m.b.parameters(), "name": "b"}])
    GradNormMonitor().on_before_optimizer_step(SimpleNamespace(global_step=0), m, opt)
    want = torch.cat([p.grad.flatten() for p in m.parameters()]).norm()
    assert abs(m.logged["grad/norm_total"] - float(want)) < 1e-5
    ga = torch.cat([p.grad.flatten() for p in m.a.parameters()]).norm()
    assert abs(m.logged["grad/norm_a"] - float(ga)) < 1e-5


def test_wandb_boxes_format():
    d = wandb_boxes([[1, 2, 3, 4]], ["red cube"], [0.5])
    box = d["box_data"][0]
    assert box["position"] == {"minX": 1.0, "minY": 2.0, "maxX": 3.0, "maxY": 4.0} and box["domain"] == "pixel"
    assert d["class_labels"][box["class_id"]] == "red cube" and box["scores"]["score"] == 0.5


def test_validation_images_logged_offline(tmp_path, synthetic_shards, tokenizer):
    from glip_pl.data import PromptConfig, SourceSpec, TransformConfig, build_loader
    from glip_pl.lit.logging import GLIPWandbLogger
    from glip_pl.model import build_glip

    loader = build_loader([SourceSpec(urls=f"{synthetic_shards}/detection", split="val")], tokenizer, 2,
                          train=False, transforms=TransformConfig.eval(128, 160), prompts=PromptConfig(mode="all"))
    batch = next(iter(loader))
    model = build_glip("tiny").eval()
    with torch.no_grad():
        out = model(batch.images, batch.image_sizes, batch.text)
        dets = model.postprocess(out, batch.phrase_maps, batch.image_sizes.tolist(), batch.orig_sizes.tolist(),
                                 score_thresh=0.0)
    panels = validation_image_panels(batch, dets, 2, score_thresh=0.0)
    assert len(panels) == 2
    h, w = batch.image_sizes[0].tolist()
    assert panels[0]["image"].shape == (h, w, 3)
    gt = panels[0]["boxes"]["ground_truth"]["box_data"]
    assert len(gt) == int(batch.targets.valid[0].sum())
    assert {b["box_caption"] for b in gt} <= set(batch.phrase_names[0])
    pr = panels[0]["boxes"]["predictions"]["box_data"]
    assert pr and all(0 <= b["position"]["minX"] <= w + 1 for b in pr)

    logger = GLIPWandbLogger(save_dir=str(tmp_path), offline=True)
    trainer = SimpleNamespace(is_global_zero=True, sanity_checking=False, loggers=[logger], global_step=5)
    cb = ValidationImageLogger(every_n_val_steps=2, max_images=2)
    cb.on_validation_epoch_start(trainer, None)
    cb.on_validation_batch_end(trainer, None, dets, batch, 1)  # not a logging step
    assert cb.logged_total == 0
    cb.on_validation_batch_end(trainer, None, dets, batch, 0)
    assert cb.logged_total == 2
    logger.experiment.finish()
    media = list(tmp_path.glob("wandb/offline-run-*/files/media/images/**/*.png"))
    boxes = list(tmp_path.glob("wandb/offline-run-*/files/media/metadata/boxes2D/**/*.boxes2D.json"))
    assert len(media) == 2 and len(boxes) >= 2, sorted(p.name for p in tmp_path.rglob("*"))[:40]
