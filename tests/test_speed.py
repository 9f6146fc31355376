import pytest
import torch

from tunelab import device
from tunelab.encoding import encode_examples
from tunelab.models import load_model
from tunelab.template import IGNORE, Template
from tunelab.train import loss
from tunelab.train.batching import pack
from tunelab.train.loss import token_loss


@pytest.fixture(scope="module")
def encoded(tokenizer, conversations):
    return encode_examples(conversations(6), Template.for_model(tokenizer), max_length=512)[0]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """The same weights with transformers' SDPA (dense block-diagonal mask) and packed attention."""
    reference = load_model(tiny_model_dir).eval()
    packed = load_model(tiny_model_dir).eval()
    device.use_packed_attention(packed)
    assert packed.config._attn_implementation == device.PACKED_ATTENTION
    return reference, packed


def test_packed_attention_equals_transformers(models, encoded):
    reference, packed = models
    for item in encoded[:3]:
        expected = reference(input_ids=torch.tensor([item.input_ids]), labels=torch.tensor([item.labels])).loss
        assert token_loss(packed, pack([item])).item() == pytest.approx(expected.item(), abs=1e-5)
    batch = pack(encoded)
    assert token_loss(packed, batch).item() == pytest.approx(token_loss(reference, batch).item(), abs=1e-5)


def test_gpu_keeps_sdpa_over_the_block_mask(tiny_model_dir, encoded):
    """On a GPU the model keeps SDPA (one kernel over transformers' block-diagonal mask), which
    keeps the examples of a packed row apart: no per-example fallback, the same loss."""
    model = load_model(tiny_model_dir).eval()
    device.prepare_model(model, device=torch.device("cuda"))
    assert model.config._attn_implementation == "sdpa" and device.runs_packed(model)
    separate = sum(token_loss(model, pack([item]), reduction="sum").item() for item in encoded)
    assert token_loss(model, pack(encoded), reduction="sum").item() == pytest.approx(separate, rel=1e-5)
    device.prepare_model(model, device=torch.device("cpu"))
    assert model.config._attn_implementation == device.PACKED_ATTENTION


def test_packed_attention_falls_back_without_boundaries(models, encoded):
    """Generation-style calls (padded batches, no cu_seq_lens) still use the mask."""
    reference, packed = models
    ids = torch.tensor([encoded[0].input_ids[:20], encoded[1].input_ids[:20]])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        assert torch.allclose(packed(input_ids=ids, attention_mask=mask).logits,
                              reference(input_ids=ids, attention_mask=mask).logits, atol=1e-5)


def test_chunked_loss_equals_whole_loss_and_gradients(tiny_model_dir, encoded):
    model = load_model(tiny_model_dir)
    batch = pack(encoded)
    targets = batch["targets"][0]
    keep = (targets != IGNORE).nonzero().squeeze(-1)
    assert len(keep) > 7 * 3  # several chunks, the last one partial

    whole = token_loss(model, batch, reduction="sum")
    whole.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    chunked = loss.chunked_token_loss(model, inputs, keep, targets[keep], chunk=7)
    chunked.backward()
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-5)
    for name, p in model.named_parameters():  # sums of many terms: compare relative to their size
        assert (p.grad - expected[name]).norm() <= 1e-5 * expected[name].norm(), name
    assert type(model.get_output_embeddings().forward).__name__ == "method"  # the head is itself again


def test_token_loss_chunks_long_batches(tiny_model_dir, encoded, monkeypatch):
    model = load_model(tiny_model_dir).eval()
    batch = pack(encoded)
    with torch.no_grad():
        whole = token_loss(model, batch).item()
        monkeypatch.setattr(loss, "LOSS_CHUNK", 5)
        calls = []
        original = loss.chunked_token_loss
        monkeypatch.setattr(loss, "chunked_token_loss", lambda *a, **k: calls.append(1) or original(*a, chunk=5))
        assert token_loss(model, batch).item() == pytest.approx(whole, rel=1e-5)
    assert calls


def test_chunked_loss_declines_a_wrapped_head(tiny_model_dir, encoded):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=2, target_modules=["lm_head"]))
    batch = pack(encoded[:2])
    keep = (batch["targets"][0] != IGNORE).nonzero().squeeze(-1)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    assert loss.chunked_token_loss(model, inputs, keep, batch["targets"][0][keep]) is None


HEAP_PROBE = """
import ctypes
import torch
from tunelab import device

libc = device._glibc()
if libc is None or not hasattr(libc, "mallinfo2"):
    raise SystemExit(3)

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc.mallinfo2.restype = Mallinfo2

def mmapped() -> int:
    before = libc.mallinfo2().hblkhd  # bytes malloc holds in separate mmaps
    block = torch.empty(64 << 20, dtype=torch.uint8)  # over glibc's largest automatic threshold, 32 MiB
    grown = libc.mallinfo2().hblkhd - before
    del block
    return grown

outside = mmapped()
with device.reuse_freed_memory():
    inside = mmapped()
print(outside, inside, mmapped())
"""


@pytest.mark.slow
def test_large_blocks_come_from_the_heap_while_training():
    """In a fresh process: a heap that earlier tests left with large free chunks would serve the
    block without mmap either way."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import tunelab

    env = {**os.environ, "PYTHONPATH": str(Path(tunelab.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, env=env, timeout=120)
    if done.returncode == 3:
        pytest.skip("needs glibc 2.33 or later")
    assert done.returncode == 0, done.stderr[-2000:]
    outside, inside, after = map(int, done.stdout.split())
    size = 64 << 20
    assert outside >= size and inside == 0 and after >= size  # glibc's defaults are back afterwards


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_backward_step_gradient_is_the_mean_over_all_trained_tokens(tiny_model_dir, encoded, grad_accum):
    """Micro-batches of very different sizes, accumulated: the gradient equals that of the mean
    token loss of all their examples in one batch (no factor of the accumulation steps left over)."""
    model = load_model(tiny_model_dir)
    reference = token_loss(model, pack(encoded))
    reference.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    accelerator = device.make_accelerator(grad_accum, "fp32")
    micro_batches = [pack(encoded[:1]), pack(encoded[1:2]), pack(encoded[2:])]
    trained = [int((b["targets"] != IGNORE).sum()) for b in micro_batches]
    assert max(trained) > 2 * min(trained)  # a plain mean of micro-batch means would be off
    mean, tokens = loss.backward_step(accelerator, model, micro_batches)
    assert mean.item() == pytest.approx(reference.item(), rel=1e-5)
    assert tokens == sum(len(e.input_ids) for e in encoded)
    assert accelerator.sync_gradients  # the optimizer steps after the last micro-batch
    for name, p in model.named_parameters():
        assert (p.grad - expected[name]).norm() <= 1e-5 * expected[name].norm(), name
