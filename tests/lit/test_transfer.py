"""Transfer (issue 5): starting from one tiny checkpoint pre-trained through the CLI on synthetic detection +
grounding, a small full fine-tune and a prompt-tuning run (only the zero-init prompt trains) on an ODinW-style custom
set raise box AP on that set's val split, and lower its held-out loss.

The custom set is the synthetic detection split with the class names overridden (``categories`` of the source, as a
user renames an ODinW set's classes): colour and shape words the pre-training data never used ("ruby disc", "jade
block", ...). Zero-shot the pre-trained model reads them poorly (AP 0.15 where the original names give 0.32), so what
fine-tuning and prompt tuning add is measured well above the run-to-run noise of a tiny model's AP (±0.02 at these
budgets; see AP_MARGIN); on the original names the model is already trained, where more steps move AP by noise only.

"Before" is measured by the same evaluator on the same val batches: each run validates before its first step
(Lightning's sanity pass with ``num_sanity_val_steps == limit_val_batches``) and after its last.
"""

from pathlib import Path

import pytest
import torch
import yaml
from helpers.pretrained import PRETRAIN_STEPS, SIZE, fit, recipe

# The custom set's class names, in the synthetic category order (id 1 + 4 * shape + colour): unseen words.
COLOURS, SHAPES = ("ruby", "jade", "navy", "amber"), ("disc", "block", "wedge")
CUSTOM = [{"id": 1 + 4 * s + c, "name": f"{COLOURS[c]} {SHAPES[s]}"} for s in range(3) for c in range(4)]
FINETUNE_STEPS, PROMPT_STEPS = 120, 120
# Asserted AP gain. Over three seeds of the whole chain (pre-training + transfer; seeds 7, 8, 9) the gains were
# fine-tune +0.228 / +0.041 / +0.136 and prompt tuning +0.117 / +0.056 / +0.148; the suite runs seed 7. (Those were
# measured before the eval loader restarted every pass: the AP after training was then scored on the other 16 of the
# 32 val images. Scored on the same 16, seed 7: fine-tune +0.229, prompt tuning +0.208; since the grid_sample form of
# the deformable convs (commit 102e875, a different float rounding of the whole chain): +0.175, +0.121.)
AP_MARGIN = 0.03


@pytest.fixture(scope="module")
def pretrained(pretrained_tiny):
    """The shared tiny checkpoint (tests/helpers/pretrained.py: CLI pre-training on synthetic detection + grounding)."""
    tmp, ckpt = pretrained_tiny
    assert torch.load(ckpt, weights_only=True)["global_step"] == PRETRAIN_STEPS
    return tmp, ckpt  # its AP is measured by each transfer run's first validation


def transfer_run(pretrained, shards, name, steps, model):
    tmp, ckpt = pretrained
    cfg = recipe(tmp, name, shards, steps=steps, val_first=True, val={"categories": CUSTOM},
                 model={"preset": "tiny", "init_weights": str(ckpt), "warmup_steps": 0, "schedule": "constant", **model},
                 # the custom set: renamed classes; fine-tune prompt = all classes, no negatives
                 train=[{"urls": f"{shards}/detection", "prompt_mode": "all", "categories": CUSTOM}])
    aps, last = fit(cfg)
    (s0, before), (s1, after) = aps[0], aps[-1]
    assert (s0, s1) == (0, steps), aps
    print(f"{name}: val box AP {before:.3f} -> {after:.3f}")
    return before, after, last


def state(path):
    return {k[len("model."):]: v for k, v in torch.load(path, weights_only=True)["state_dict"].items()}


def test_full_finetune_raises_ap_and_lowers_val_loss(pretrained, synthetic_shards):
    """A full fine-tune on the custom set (all-class prompt of its renamed classes) raises its val box AP and lowers
    its held-out loss. Measured on this machine: AP 0.158 -> 0.333 (0.138 -> 0.367 before commit 102e875; tiny, the shared pre-training of
    tests/helpers/pretrained.py, then 120 fine-tuning steps of batch 2 at 160 px, lr 5e-4)."""
    before, after, last = transfer_run(pretrained, synthetic_shards, "finetune", FINETUNE_STEPS,
                                       {"lr": 5e-4, "lang_lr": 5e-4})
    start, end = state(pretrained[1]), state(last)
    assert set(start) == set(end) and any(not torch.equal(start[k], end[k]) for k in start)
    loss0, loss1 = val_loss(pretrained[1], synthetic_shards, False), val_loss(last, synthetic_shards, False)
    print(f"finetune: val loss {loss0:.4f} -> {loss1:.4f}, val box AP {before:.3f} -> {after:.3f}")
    assert loss1 < loss0
    assert after > before + AP_MARGIN, (before, after)


def val_loss(ckpt, shards, prompt_tuning):
    """Mean total loss of a checkpoint on all 32 custom-set val images with its all-class prompt (eval mode)."""
    from glip_pl.lit.datamodule import GroundingDataModule
    from glip_pl.model import build_glip

    dm = GroundingDataModule(val=[{"urls": f"{shards}/detection", "split": "val", "categories": CUSTOM}],
                             batch_size=2, num_workers=0,
                             val_size=SIZE, val_max_size=SIZE)
    model = build_glip("tiny", prompt_tuning=prompt_tuning).eval()
    model.load_state_dict(state(ckpt), strict=not prompt_tuning)  # the detector has no prompt (= zero)
    with torch.no_grad():
        losses = [float(model.criterion.total(model.loss(model(b.images, b.image_sizes, b.text), b.targets)))
                  for b in dm.val_dataloader()]
    return sum(losses) / len(losses)


def test_prompt_tuning_trains_only_the_prompt_and_lowers_val_loss(pretrained, synthetic_shards):
    """Official prompt tuning (lr 0.05, wd 0.25, all else frozen) on the custom set: only the prompt changes and the
    held-out loss falls and the renamed set's AP rises. Measured on this machine: AP 0.158 -> 0.279 (0.138 -> 0.346 before 102e875) in 120 steps of
    batch 2 at 160 px (asserted: a gain above AP_MARGIN). This needs a base that already tells
    the classes apart by their names: from the earlier 150-step, 128-px base (AP 0.04 on the original names) the same
    run moved AP 0.044 -> 0.041. From a demo-budget base (400 steps at 256 px, AP 0.419) prompt tuning lifts the
    renamed set 0.147 -> 0.444 (100 steps of batch 4 at 256 px, measured outside the suite). The paper finds prompt
    tuning strongest where the scored text is deep-fused; the tiny preset scores the encoder's text (GLIP-T(A)-like,
    see presets.py)."""
    before, after, last = transfer_run(pretrained, synthetic_shards, "prompt", PROMPT_STEPS,
                                       {"model_options": {"prompt_tuning": True}, "lr": 0.05, "lang_lr": 0.05,
                                        "weight_decay": 0.25})
    start, end = state(pretrained[1]), state(last)
    assert set(end) - set(start) == {"prompt.weight"}
    changed = [k for k in start if not torch.equal(start[k], end[k])]
    assert changed == [], changed[:5]  # everything but the prompt is frozen
    assert end["prompt.weight"].shape == (256, 64) and end["prompt.weight"].abs().sum() > 0
    loss0, loss1 = val_loss(pretrained[1], synthetic_shards, False), val_loss(last, synthetic_shards, True)
    print(f"prompt tuning: val loss {loss0:.4f} -> {loss1:.4f}, val box AP {before:.3f} -> {after:.3f}")
    assert loss1 < loss0
    assert after > before + AP_MARGIN, (before, after)


# ------------------------------------------------------------------ fast checks (no training)
def test_prompt_tuned_model_starts_as_the_detector_and_only_the_prompt_trains(tmp_path):
    from glip_pl.lit.module import GLIPLitModule
    from glip_pl.model import build_glip
    from glip_pl.model.prompt_tuning import official_to_prompt, prompt_to_official

    torch.manual_seed(0)
    base = build_glip("tiny").eval()
    ck = tmp_path / "detector.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in base.state_dict().items()},
                "hyper_parameters": {"preset": "tiny", "model_options": {}}}, ck)
    lit = GLIPLitModule(preset="tiny", model_options={"prompt_tuning": True}, init_weights=str(ck))
    tuned = lit.model.eval()
    assert [n for n, p in tuned.named_parameters() if p.requires_grad] == ["prompt.weight"]
    text, _ = tuned.tokenize(["red circle. blue square"])
    with torch.no_grad():
        assert torch.equal(base.encode_text(text), tuned.encode_text(text))  # zero prompt = the detector
        tuned.prompt.weight[1].fill_(1.0)
        delta = tuned.encode_text(text) - base.encode_text(text)
    assert torch.allclose(delta[:, 1], torch.ones_like(delta[:, 1])) and delta[:, [0, 2]].abs().max() == 0
    opt = torch.optim.AdamW([p for n, p in tuned.named_parameters() if p.requires_grad])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 256 * 64
    official = prompt_to_official(tuned.prompt.weight.detach())
    assert official.shape == (1000, 64) and official[256:].abs().max() == 0
    assert torch.equal(official_to_prompt(official, 256), tuned.prompt.weight.detach())


@pytest.mark.parametrize("name", ["coco", "odinw_custom", "prompt_tuning"])
def test_finetune_recipes_header_and_model_options(name):
    from glip_pl.model.presets import get_config

    path = Path(__file__).resolve().parents[2] / "recipes" / "finetune" / f"{name}.yaml"
    head = "\n".join(path.read_text().splitlines()[:9])
    for word in ("GLIP paper", "Target:", "Data:", "Hardware:", "Launch:", "Batch arithmetic"):
        assert word in head, (name, word)
    cfg = yaml.safe_load(path.read_text())
    model = get_config(cfg["model"]["preset"], **cfg["model"].get("model_options", {}))  # options are valid
    assert all(s.get("prompt_mode") == "all" for s in cfg["data"]["train"])
    if name == "prompt_tuning":
        assert model.prompt_tuning and cfg["model"]["lr"] == 0.05 and cfg["model"]["weight_decay"] == 0.25
    if name == "coco":
        assert cfg["model"]["lr"] == cfg["model"]["lang_lr"] == 1e-5
    from glip_pl.lit.module import GLIPLitModule

    if name in ("odinw_custom", "prompt_tuning"):  # official auto-step: STEP_PATIENCE 3, early stop 8
        assert cfg["model"]["schedule"] == "autostep" and cfg["model"]["autostep_patience"] == 3
        stop = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("EarlyStopping")]
        assert stop and stop[0]["init_args"]["patience"] == 8 and stop[0]["init_args"]["monitor"] == "val/AP"
        GLIPLitModule(preset="tiny", **{k: v for k, v in cfg["model"].items()
                                        if k not in ("preset", "init_weights", "model_options")})  # options valid
    if name == "odinw_custom":
        assert model.swin.frozen_stages == 2 and cfg["model"]["weight_decay"] == 0.05 and cfg["data"]["batch_size"] == 4
