"""Any local model folder trains, resumes, generates and evaluates: tiny random models (2 layers,
hidden 64, SmolLM2's real tokenizer) of each architecture family, through the real CLI."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tunelab import device
from tunelab.cli import main
from tunelab.data.load import Example
from tunelab.encoding import encode_examples
from tunelab.models import load_model
from tunelab.run import Run
from tunelab.template import IGNORE, Template
from tunelab.train.batching import pack
from tunelab.train.loss import backward_step, chunked_token_loss, heldout_loss, token_loss

WINDOW = 16
"""Sliding-window layers get a window shorter than the examples, so the window matters."""

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": WINDOW}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": WINDOW}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": WINDOW}),
}
def tiny_model(name: str, folder, tokenizer):
    """Save a randomly initialised model of family `name` and the tokenizer in `folder`."""
    import transformers

    config_class, model_class, extra = FAMILIES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra,
    )
    getattr(transformers, model_class)(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, tokenizer) -> tuple[str, object]:
    """(family name, local folder of a tiny random model of that family)."""
    return request.param, tiny_model(request.param, tmp_path_factory.mktemp(request.param), tokenizer)


@pytest.fixture(scope="module")
def data(tmp_path_factory, write_jsonl):
    cities = [("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy")]
    rows = [{"prompt": f"Country of {city}? ({i})", "completion": country}
            for i in range(4) for city, country in cities]
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows)


def losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def weights(folder) -> dict[str, torch.Tensor]:
    return {name: tensor for path in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(path).items()}


def train(data, base, out, *flags: str) -> None:
    assert main(["train", str(data), "--base", str(base), "--out", str(out), "--batch-size", "4",
                 "--test-size", "4", "--eval-every", "100", "--lr", "0.01", *flags]) == 0


@pytest.mark.slow
def test_lora_trains_resumes_generates_and_evaluates(family, data, tmp_path, capsys):
    name, base = family
    out = tmp_path / "lora"
    train(data, base, out, "--max-steps", "3", "--save-every", "1", "--keep", "3")
    capsys.readouterr()
    assert len(losses(out)) == 3 and all(math.isfinite(x) for x in losses(out))
    adapter = weights(out / "adapter")
    trained = [t for key, t in adapter.items() if "lora_B" in key]  # peft starts every lora_B at zero
    assert trained and all(t.abs().sum() > 0 for t in trained), name

    # A run that died after its second checkpoint ends, once resumed, with the same weights.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "adapter")
    shutil.rmtree(resumed / "checkpoints" / "step-000003")
    train(data, base, resumed, "--resume")
    for key, tensor in weights(resumed / "adapter").items():
        assert torch.equal(tensor, adapter[key]), (name, key)

    # Greedy answers to prompts of very different lengths: batched (left padding) as one by one.
    run = Run(out)
    prompts = ["Rome?", "Country of Paris? (1) " + "Please answer with the country's name only. " * 6]
    batched = run.generate_batch(prompts, max_new_tokens=6)
    assert batched == [run.generate(p, max_new_tokens=6) for p in prompts], name

    results = run.evaluate(limit=2, max_new_tokens=4, shots=0, retrieval=False, forgetting=None, progress=False)
    base, tuned = (results.metrics[name]["heldout_loss"].value for name in ("zero-shot", "tuned"))
    assert math.isfinite(base) and math.isfinite(tuned) and tuned != base


@pytest.mark.slow
def test_full_fine_tuning_changes_every_weight_tensor(family, data, tmp_path):
    name, base = family
    out = tmp_path / "full"
    train(data, base, out, "--method", "full", "--max-steps", "2", "--lr", "0.001")
    assert len(losses(out)) == 2 and all(math.isfinite(x) for x in losses(out))
    before, after = weights(base), weights(out / "model")
    assert before.keys() == after.keys()
    unchanged = [key for key in before if torch.equal(before[key], after[key])]
    assert not unchanged, (name, unchanged)
    assert Run(out).generate("Country of Rome?", max_new_tokens=4) is not None


def examples(tokenizer) -> list:
    """Examples of different lengths, each longer than the sliding window."""
    rows = [Example([{"role": "user", "content": f"Question number {i}, " * (2 + i % 3)},
                     {"role": "assistant", "content": f"Answer {i} " * (2 + i % 2)}], i + 1) for i in range(4)]
    encoded = encode_examples(rows, Template.for_model(tokenizer), max_length=512)[0]
    assert all(len(item.input_ids) > WINDOW for item in encoded)
    return encoded


def test_the_training_step_gives_each_example_its_own_loss(family, tokenizer, capsys):
    """The step's loss over a packed micro-batch, whichever attention the model can run, equals
    the mean of the model's own loss over each example alone, token-weighted."""
    name, base = family
    encoded = examples(tokenizer)
    reference = load_model(base).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for item in encoded:
            logits = reference(input_ids=torch.tensor([item.input_ids])).logits[0, :-1]
            labels = torch.tensor(item.labels[1:])
            total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            count += int((labels != IGNORE).sum())

    model = load_model(base).eval()
    packed = device.use_packed_attention(model)
    note = capsys.readouterr().err
    # Gemma 2 soft-caps its attention scores, which SDPA cannot: it keeps its own attention.
    assert packed == (name != "gemma2"), name
    assert ("cannot use packed per-example attention" in note) == (not packed)
    accelerator = device.make_accelerator(1, "fp32")
    loss, _ = backward_step(accelerator, model, [pack(encoded)])
    assert loss.item() == pytest.approx(total / count, abs=1e-5), name
    assert all(p.grad is not None for p in model.parameters())
    # The held-out loss packs its batches too, whichever attention the model runs.
    assert heldout_loss(model, encoded) == pytest.approx(total / count, abs=1e-5), name


def test_chunked_loss_declines_a_soft_capped_output(tokenizer, tmp_path):
    """Gemma 2 soft-caps its logits after the output projection, which the chunked loss would skip."""
    model = load_model(tiny_model("gemma2", tmp_path, tokenizer))
    batch = pack(examples(tokenizer))
    targets = batch["targets"][0]
    keep = (targets != IGNORE).nonzero().squeeze(-1)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    assert chunked_token_loss(model, inputs, keep, targets[keep], chunk=5) is None
    assert torch.isfinite(token_loss(model, batch))


def test_transformers_still_hands_packed_attention_what_it_relies_on(family):
    """Packed attention relies on interfaces of transformers that a release may change:
    `AttentionInterface.register`, `masking_utils.ALL_MASK_ATTENTION_FUNCTIONS` and `sdpa_mask`,
    `config._attn_implementation`, and the keyword arguments each attention layer passes on to
    the attention function (`cu_seq_lens_q` from the batch, `sliding_window`). Without
    `cu_seq_lens_q` packed attention would silently fall back to a dense mask over the row."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    name, base = family
    if name == "gemma2":
        pytest.skip("Gemma 2 does not take SDPA-based attention")
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("tunelab_spy_sdpa", spy)
    ALL_MASK_ATTENTION_FUNCTIONS.register("tunelab_spy_sdpa", sdpa_mask)
    model = load_model(base).eval()
    model.set_attn_implementation("tunelab_spy_sdpa")
    assert model.config._attn_implementation == "tunelab_spy_sdpa", "config._attn_implementation changed"
    ids = torch.arange(10, 30)[None]
    with torch.no_grad():
        model(input_ids=ids, position_ids=torch.arange(20)[None],
              cu_seq_lens_q=torch.tensor([0, 20], dtype=torch.int32), use_cache=False)
    assert seen, f"{name}: transformers no longer calls a registered attention function"
    assert all("cu_seq_lens_q" in kwargs for kwargs in seen), \
        f"{name}: transformers no longer passes cu_seq_lens_q on to the attention function"
    window = [kwargs.get("sliding_window") for kwargs in seen]
    if FAMILIES[name][2].get("sliding_window"):
        assert WINDOW in window, f"{name}: transformers no longer passes sliding_window to the attention function"
