"""LoRA on a model that ties its output layer to its input embeddings (SmolLM2 does): the merged
model that evaluation, generation and export use computes what the adapter computes."""

import warnings

import pytest
import torch

from tunelab.cli import main
from tunelab.models import load_model
from tunelab.run import Run

IDS = torch.tensor([[1, 520, 640, 771, 803, 42, 9, 300]])


@pytest.fixture(scope="module")
def data(tmp_path_factory, write_jsonl):
    rows = [{"prompt": f"Country of {city}? ({i})", "completion": country}
            for i in range(3) for city, country in [("Paris", "France"), ("Rome", "Italy"), ("Oslo", "Norway")]]
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with its own output layer (a copy of the embeddings, then perturbed)."""
    model = load_model(tiny_model_dir)
    model.config.tie_word_embeddings = False
    head = torch.nn.Linear(64, model.config.vocab_size, bias=False)
    head.weight.data = model.get_input_embeddings().weight.data.clone() + 0.01
    model.set_output_embeddings(head)
    folder = tmp_path_factory.mktemp("untied")
    model.save_pretrained(folder)
    model = load_model(folder)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    return folder


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def train_and_compare(data, base, out, targets: str) -> None:
    """Train LoRA on `targets`; the merged model (Run.model()) gives the adapter's logits, which
    differ from the base model's by far more than the tolerance."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*tie", UserWarning)  # peft's "a tied layer is part of the adapter"
        assert main(["train", str(data), "--base", str(base), "--out", str(out), "--lora-targets", targets,
                     "--max-steps", "3", "--lr", "0.05", "--batch-size", "3", "--test-size", "0"]) == 0
    adapter = PeftModel.from_pretrained(load_model(base), str(out / "adapter"))
    unmerged, base_logits = logits_of(adapter), logits_of(load_model(base))
    merged = Run(out).model()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (unmerged - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(logits_of(merged), unmerged, atol=1e-4, rtol=1e-4)


def test_default_targets_merge_into_a_tied_model(data, tiny_model_dir, tmp_path):
    train_and_compare(data, tiny_model_dir, tmp_path / "run", "all-linear")
    merged = Run(tmp_path / "run").model()
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight  # still tied


def test_named_targets_with_the_output_layer_merge_into_an_untied_model(data, untied_model_dir, tmp_path):
    train_and_compare(data, untied_model_dir, tmp_path / "run", "q_proj,v_proj,lm_head")


@pytest.mark.parametrize("targets", ["q_proj,lm_head", "embed_tokens", "model.embed_tokens,v_proj"])
def test_a_tied_layer_as_target_is_refused_in_one_line(data, tiny_model_dir, tmp_path, capsys, targets):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*tie", UserWarning)  # refused before peft warns
        code = main(["train", str(data), "--base", str(tiny_model_dir), "--out", str(tmp_path / "run"),
                     "--lora-targets", targets, "--max-steps", "1"])
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("tunelab:")]
    assert code == 2 and len(err) == 1 and "Traceback" not in stderr, stderr
    tied = [t for t in targets.split(",") if t.endswith(("lm_head", "embed_tokens"))]
    assert err[0].startswith(f"tunelab: error: --lora-targets {','.join(tied)}: ")
    assert "ties its output layer to its input embeddings" in err[0] and "all-linear" in err[0]
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_peft_still_merges_an_adapter_on_tied_layers_twice(tiny_model_dir):
    """Why tied layers are refused: peft's `ensure_weight_tying` keeps one adapter for both
    places, but `merge_and_unload` then adds its update to the shared weight twice. When this
    test fails, peft merges tied adapters correctly: `train._refuse_tied_targets` can go, passing
    `ensure_weight_tying=True` instead."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_model(tiny_model_dir), LoraConfig(
            r=4, target_modules=["q_proj", "lm_head"], ensure_weight_tying=True, task_type="CAUSAL_LM"))
        torch.manual_seed(0)
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data.normal_(0, 0.1)
        adapted = logits_of(model)
        merged = logits_of(model.merge_and_unload())
    assert (merged - adapted).abs().max() > 0.1


def test_lora_of_an_untied_model_in_bf16_trains_through_the_chunked_output_projection(
        data, untied_model_dir, tmp_path, monkeypatch):
    """Under bf16 autocast LoRA holds the frozen linear layers in bf16, but not the output layer:
    the chunked output projection (train/loss.py, past LOSS_CHUNK trained tokens) runs outside
    autocast, where a bf16 weight would meet fp32 hidden states."""
    from tunelab import device
    from tunelab.train import loss

    monkeypatch.setattr(loss, "LOSS_CHUNK", 4)  # every batch of this data goes through the chunks
    chunked, held = [], []
    real_chunked, real_hold = loss.chunked_token_loss, device.frozen_base_in_bf16

    def counting(*args, **kwargs):
        total = real_chunked(*args, **kwargs)
        chunked.append(total is not None)
        return total

    def holding(model):
        cast = real_hold(model)
        held.append((cast, model.get_output_embeddings().weight.dtype))
        return cast

    monkeypatch.setattr(loss, "chunked_token_loss", counting)
    monkeypatch.setattr(device, "frozen_base_in_bf16", holding)
    assert main(["train", str(data), "--base", str(untied_model_dir), "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--batch-size", "3", "--test-size", "0", "--precision", "bf16"]) == 0
    [(cast, head_dtype)] = held
    assert cast > 0 and head_dtype == torch.float32
    assert chunked and all(chunked)
