import pytest
import torch

from tunelab.data.load import Example
from tunelab.encoding import encode_examples
from tunelab.errors import UserError
from tunelab.models import load_model
from tunelab.template import IGNORE, Template
from tunelab.train.batching import pack
from tunelab.train.loss import heldout_loss, token_loss


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tokenizer, conversations):
    template = Template.for_model(tokenizer)
    encoded, _ = encode_examples(conversations(5), template, max_length=512)
    return load_model(tiny_model_dir).eval(), encoded


def test_loss_equals_transformers_mean_token_cross_entropy(setup):
    model, encoded = setup
    for item in encoded:
        reference = model(input_ids=torch.tensor([item.input_ids]), labels=torch.tensor([item.labels])).loss
        ours = token_loss(model, pack([item]))
        assert abs(ours.item() - reference.item()) < 1e-5


def test_packing_does_not_change_the_loss(setup):
    model, encoded = setup
    with torch.no_grad():
        packed = token_loss(model, pack(encoded), reduction="sum").item()
        separate = sum(token_loss(model, pack([item]), reduction="sum").item() for item in encoded)
    assert packed == pytest.approx(separate, rel=1e-5)
    count = sum(sum(t != IGNORE for t in item.labels[1:]) for item in encoded)
    assert heldout_loss(model, encoded, batch_size=2) == pytest.approx(separate / count, rel=1e-5)


def test_targets_never_cross_example_boundaries(setup):
    _, encoded = setup
    batch = pack(encoded[:2])
    boundary = len(encoded[0].input_ids) - 1
    assert batch["targets"][0, boundary] == IGNORE
    assert batch["position_ids"][0, boundary + 1] == 0


def test_truncation_policies(tokenizer, conversations):
    template = Template.for_model(tokenizer)
    examples = conversations(4)
    lengths = [len(template.encode(e.messages).input_ids) for e in examples]
    limit = max(lengths) - 2  # trims the longest answers, keeps some of each
    kept, stats = encode_examples(examples, template, limit, truncation="drop")
    assert len(kept) == sum(n <= limit for n in lengths) and len(stats.dropped) == 4 - len(kept)
    kept, stats = encode_examples(examples, template, limit, truncation="truncate")
    assert len(kept) == 4 and stats.truncated == sum(n > limit for n in lengths)
    assert all(len(item.input_ids) <= limit for item in kept)
    with pytest.raises(UserError, match=r"data:\d+: example has \d+ tokens, over --max-length"):
        encode_examples(examples, template, limit, truncation="error")
    prompt_only = len(template.encode_prompt(examples[0].prompt_messages()))
    with pytest.raises(UserError, match="no response tokens left to train"):
        encode_examples(examples[:1], template, prompt_only, truncation="truncate")


def test_raw_documents_are_chunked_with_every_token_trained(tokenizer):
    template = Template.for_model(tokenizer)
    documents = [Example([], 1, text="word " * 50), Example([], 2, text="short")]
    encoded, stats = encode_examples(documents, template, max_length=16, truncation="error")
    whole = template.encode_text("word " * 50).input_ids
    assert len(whole) % 16 > 1 and stats.kept == 2 and stats.chunks == len(whole) // 16 + 2
    assert [len(e.input_ids) for e in encoded[:-1]] == [16] * (len(whole) // 16) + [len(whole) % 16]
    assert [t for e in encoded[:-1] for t in e.input_ids] == whole  # chunks in order, nothing lost
    assert all(e.labels == e.input_ids for e in encoded)
    assert encoded[-1].input_ids == template.encode_text("short").input_ids
