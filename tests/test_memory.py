"""What training and evaluation free, and when (docs/BENCHMARKS.md, "Where the demo's memory
goes"): a model no longer used is gone before the next phase, whatever cycles hold it, and the
held-out loss builds no autograd graph. Behaviours, not memory figures, which depend on the machine."""

from __future__ import annotations

import shutil
import weakref

import pytest
import torch

from tunelab import device
from tunelab.config import TrainConfig
from tunelab.run import Run
from tunelab.train import loop
from tunelab.train import loss as loss_mod
from tunelab.train.loop import train


@pytest.mark.slow
def test_the_trained_model_and_its_optimizer_are_gone_when_training_returns(tmp_path, pairs_file,
                                                                            tiny_model_dir, monkeypatch):
    built, optimizers = [], []
    build_model, make_optimizer = loop.build_model, device.make_optimizer

    def recorded_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    def recorded_optimizer(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)
        optimizers.append(weakref.ref(optimizer))
        return optimizer

    monkeypatch.setattr(loop, "build_model", recorded_model)
    monkeypatch.setattr(device, "make_optimizer", recorded_optimizer)
    config = TrainConfig(base=str(tiny_model_dir), method="full", max_steps=2, batch_size=4, test_size=4)
    train(config, pairs_file, tmp_path / "run", quiet=True)
    assert len(built) == 1 and len(optimizers) == 1
    assert built[0]() is None, "the trained model outlived train()"
    assert optimizers[0]() is None, "AdamW and its states outlived train()"


def test_the_optimizer_is_fused_on_the_cpu():
    """The foreach AdamW builds a temporary as large as all trained weights at every step."""
    optimizer = device.make_optimizer([torch.nn.Parameter(torch.zeros(3))], 1e-3, 0.0, torch.device("cpu"))
    assert optimizer.defaults["fused"] is True


@pytest.mark.slow
def test_the_heldout_loss_builds_no_graph(tmp_path, pairs_file, tiny_model_dir, monkeypatch):
    """The held-out pass during training runs on the model being trained (parameters requiring
    grad, train mode switched off and on): none of its losses may hold a graph."""
    losses, inside = [], []
    token_loss, heldout_loss = loss_mod.token_loss, loop.heldout_loss

    def recorded(*args, **kwargs):
        value = token_loss(*args, **kwargs)
        if inside:
            losses.append((value.requires_grad, torch.is_grad_enabled()))
        return value

    def heldout(*args, **kwargs):
        inside.append(True)
        try:
            return heldout_loss(*args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(loss_mod, "token_loss", recorded)
    monkeypatch.setattr(loop, "heldout_loss", heldout)
    config = TrainConfig(base=str(tiny_model_dir), method="full", max_steps=2, batch_size=4, test_size=4,
                         eval_every=1)
    train(config, pairs_file, tmp_path / "run", quiet=True)
    assert losses, "no held-out pass ran"
    assert all(not requires_grad and not enabled for requires_grad, enabled in losses)


@pytest.mark.slow
def test_evaluation_frees_the_base_model_before_the_tuned_one_loads(tiny_run, tmp_path, monkeypatch):
    run = shutil.copytree(tiny_run, tmp_path / "run")  # eval.json goes into the copy
    bases, alive_at_tuned_load = [], []
    base_model, model = Run.base_model, Run.model

    def recorded_base(self):
        loaded = base_model(self)
        bases.append(weakref.ref(loaded))
        return loaded

    def recorded_model(self):
        alive_at_tuned_load.extend(ref() is not None for ref in bases)
        return model(self)

    monkeypatch.setattr(Run, "base_model", recorded_base)
    monkeypatch.setattr(Run, "model", recorded_model)
    Run(run).evaluate(limit=2, shots=1, retrieval=False, max_new_tokens=4, forgetting=None, progress=False)
    assert bases and alive_at_tuned_load == [False] * len(bases)


def test_the_heap_cap_trims_only_past_the_settled_need_plus_slack(monkeypatch):
    """The first steps set the need; later steps trim the heap only once the resident memory is
    more than `slack` above it (trimming costs the next step its page faults)."""
    trims = []

    class FakeLibc:
        def malloc_trim(self, pad):
            trims.append(pad)

    monkeypatch.setattr(device, "_glibc", lambda: FakeLibc())
    resident = iter([900, 1000, 1100, 1101, 1000, 1150, 1300, 1400, 1401])
    monkeypatch.setattr(device, "resident_bytes", lambda: next(resident))
    cap = device.FreedMemoryCap(settle=2, slack=100)
    for _ in range(5):
        cap.after_step()
    assert cap.level == 1000 and trims == [0]  # after the step at 1101, not at 1100
    cap.after_step()  # 1150: past 1000 + 100
    cap.after_step()  # 1300, a bigger batch: trimmed, and the need stays that of the first steps
    assert cap.level == 1000 and len(trims) == 3
    cap.after_step()  # 1400
    cap.after_step()  # 1401
    assert len(trims) == 5 and cap.trims == 5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_demo_recomputes_activations_in_full_fine_tuning(tmp_path, tiny_model_dir, monkeypatch, method):
    """The demo's full fine-tuning peaks under 4 GiB only with every decoder layer's activations
    recomputed in backward (docs/BENCHMARKS.md); LoRA's needs no recomputation and is not slowed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from tunelab.demo import demo_config, write_dataset

    recomputed = []
    prepare_model = device.prepare_model

    def recorded(*args, **kwargs):
        model = prepare_model(*args, **kwargs)
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        recomputed.extend(layer.gradient_checkpointing for layer in layers)
        return model

    monkeypatch.setattr(device, "prepare_model", recorded)
    data = write_dataset(tmp_path / "bookings.jsonl", 40)
    config = demo_config(method, max_steps=1).model_copy(update={"base": str(tiny_model_dir)})
    train(config, data, tmp_path / "run", quiet=True)
    assert recomputed, "no decoder layer found"
    assert all(recomputed) if method == "full" else not any(recomputed)
