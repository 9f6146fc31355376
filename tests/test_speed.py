import pytest
import torch

from test_batching import conversations
from tunelab import speed
from tunelab.batching import encode_examples, pack, token_loss
from tunelab.models import load_model
from tunelab.template import IGNORE, Template


@pytest.fixture(scope="module")
def encoded(tokenizer):
    return encode_examples(conversations(6), Template.for_model(tokenizer), max_length=512)[0]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """The same weights with transformers' SDPA (dense block-diagonal mask) and packed attention."""
    reference = load_model(tiny_model_dir).eval()
    packed = load_model(tiny_model_dir).eval()
    speed.use_packed_attention(packed)
    assert packed.config._attn_implementation == speed.PACKED_ATTENTION
    return reference, packed


def test_packed_attention_equals_transformers(models, encoded):
    reference, packed = models
    for item in encoded[:3]:
        expected = reference(input_ids=torch.tensor([item.input_ids]), labels=torch.tensor([item.labels])).loss
        assert token_loss(packed, pack([item])).item() == pytest.approx(expected.item(), abs=1e-5)
    batch = pack(encoded)
    assert token_loss(packed, batch).item() == pytest.approx(token_loss(reference, batch).item(), abs=1e-5)


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
    chunked = speed.chunked_token_loss(model, inputs, keep, targets[keep], chunk=7)
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
        monkeypatch.setattr(speed, "LOSS_CHUNK", 5)
        calls = []
        original = speed.chunked_token_loss
        monkeypatch.setattr(speed, "chunked_token_loss", lambda *a, **k: calls.append(1) or original(*a, chunk=5))
        assert token_loss(model, batch).item() == pytest.approx(whole, rel=1e-5)
    assert calls


def test_chunked_loss_declines_a_wrapped_head(tiny_model_dir, encoded):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=2, target_modules=["lm_head"]))
    batch = pack(encoded[:2])
    keep = (batch["targets"][0] != IGNORE).nonzero().squeeze(-1)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    assert speed.chunked_token_loss(model, inputs, keep, batch["targets"][0][keep]) is None
