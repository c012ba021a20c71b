"""``model.compile_head``: the fusion head compiled with torch.compile gives the eager model's outputs and gradients,
keeps parameter names (checkpoints interchange), and recompiles for a new image size / prompt length.
``model.compile_step``: the whole training forward + loss compiles as one graph with eager's loss and gradients.

The test traces with TorchDynamo + AOTAutograd (backend ``aot_eager``: graph capture, functionalisation,
decompositions, the compiled backward) — where our code's compile-friendliness is decided. Inductor's code
generation on top took over 5 minutes for these two shapes on a 2-core CI machine, so it is exercised by
``benchmarks/bench_model.py`` (variant "glip_pl + torch.compile(head)", which also reports its loss against eager)
rather than here.

The model uses torchvision's deformable conv kernel (``deform_conv: torchvision``), what ``auto`` picks on CUDA where
compile pays: tracing the CPU default (the grid_sample form) also passes this test but took 133 s instead of 79 s
on the 2-core machine."""

import lightning as L
import torch

from glip_pl.lit.module import GLIPLitModule
from glip_pl.model import make_targets
from glip_pl.model.prompts import build_detection_prompt, spans_to_token_map


def _batch(model, h, w, names):
    g = torch.Generator().manual_seed(h + len(names))
    images = torch.randint(0, 256, (2, 3, h, w), generator=g, dtype=torch.uint8)
    sizes = torch.tensor([[h, w], [h - 16, w - 8]])
    prompt = build_detection_prompt(names)
    text, offsets = model.tokenize([prompt.caption] * 2)
    tmap = spans_to_token_map(prompt.caption, prompt.spans, offsets[0], text.length)
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 70.0, 60.0]]), torch.tensor([[10.0, 8.0, 50.0, 44.0]])]
    targets = make_targets(boxes, [tmap[[0, 1]], tmap[[1]]], text.length)
    return images, sizes, text, targets


def _step(model, batch):
    images, sizes, text, targets = batch
    model.zero_grad(set_to_none=True)
    out = model(images, sizes, text)
    loss = model.criterion.total(model.loss(out, targets))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


def test_compiled_head_equals_eager():
    torch.manual_seed(0)
    opts = {"dropblock": False, "deform_conv": "torchvision"}
    eager = GLIPLitModule(preset="tiny", model_options=opts).model.eval()
    graphs = []

    def backend(gm, example_inputs):  # aot_eager, counting the graphs it is handed
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = GLIPLitModule(preset="tiny", model_options=opts, compile_head=True,
                             compile_options={"backend": backend}).model.eval()
    assert list(compiled.state_dict()) == list(eager.state_dict())  # in place: no _orig_mod. prefixes
    compiled.load_state_dict(eager.state_dict())
    names = ["red circle", "blue square", "green triangle"]
    seen = []
    for h, w, n in ((96, 128, names), (128, 96, names + ["yellow square"])):  # a new size and prompt length
        batch = _batch(eager, h, w, n)
        out_e, loss_e, grads_e = _step(eager, batch)
        out_c, loss_c, grads_c = _step(compiled, batch)
        # decompositions reorder float ops: equal to fp32 rounding, not bit for bit
        torch.testing.assert_close(out_c.logits, out_e.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out_c.box_regression, out_e.box_regression, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-4)
        assert set(grads_c) == set(grads_e)
        for k in grads_e:
            torch.testing.assert_close(grads_c[k], grads_e[k], atol=1e-4, rtol=1e-3, msg=k)
        seen.append(len(graphs))
    assert 0 < seen[0] < seen[1], seen  # the head was compiled, and recompiled for the new shapes


def test_compiled_training_step_equals_eager_in_one_graph():
    """``compile_step``: the training forward + loss compiled whole (train mode, an image without boxes): one graph
    (no break), the eager loss terms and gradients, unchanged parameter names; compile_head with it is refused."""
    from types import SimpleNamespace

    import pytest

    from glip_pl.model.types import GLIPInputError

    opts = {"deform_conv": "torchvision"}
    torch.manual_seed(0)
    eager = GLIPLitModule(preset="tiny", model_options=opts).train()
    graphs = []

    def backend(gm, example_inputs):  # aot_eager, counting the graphs TorchDynamo hands over
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = GLIPLitModule(preset="tiny", model_options=opts, compile_step=True,
                             compile_options={"backend": backend}).train()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    images, sizes, text, targets = _batch(eager.model, 64, 96, ["red circle", "blue square"])
    targets.valid[1] = False  # image 1 has no box
    batch = SimpleNamespace(images=images, image_sizes=sizes, text=text, targets=targets)
    results = []
    for module in (eager, compiled):  # attached to a Trainer: the loss's reduce_mean hook asks it for world_size
        module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                                   enable_progress_bar=False, enable_model_summary=False)
        module.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the text encoder's dropout draws the same numbers in both
        terms = module._train_terms(batch)
        module.model.criterion.total(terms).backward()
        results.append((terms, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    assert len(graphs) == 1  # forward + loss in one graph: no graph break anywhere in the step
    (terms_e, grads_e), (terms_c, grads_c) = results
    assert terms_e["loss_reg"] > 0
    for k in terms_e:
        torch.testing.assert_close(terms_c[k], terms_e[k], atol=1e-5, rtol=1e-4, msg=k)
    assert set(grads_c) == set(grads_e)
    for k in grads_e:
        torch.testing.assert_close(grads_c[k], grads_e[k], atol=1e-4, rtol=1e-3, msg=k)
    with pytest.raises(GLIPInputError, match="exclude each other"):
        GLIPLitModule(preset="tiny", compile_head=True, compile_step=True)
