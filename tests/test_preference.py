"""Preference tuning (train/preference.py): the preference shapes the loader reads and the data
check's codes for malformed pairs; DPO's and ORPO's loss against a hand computation from the
model's logits; the reference being the base model with the adapter switched off, in the one
model object; DPO raising the margin of held-out pairs; resume equal to an uninterrupted run."""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunelab.cli import main
from tunelab.config import DataOptions, TrainConfig
from tunelab.data.check import check
from tunelab.data.load import iter_examples, read_jsonl
from tunelab.device import make_accelerator
from tunelab.models import load_model
from tunelab.template import IGNORE, Template
from tunelab.train import loop, preference

CITIES = [("Paris", "France", "Spain"), ("Berlin", "Germany", "Austria"), ("Madrid", "Spain", "France"),
          ("Rome", "Italy", "Greece"), ("Lisbon", "Portugal", "Spain"), ("Vienna", "Austria", "Germany"),
          ("Oslo", "Norway", "Sweden"), ("Warsaw", "Poland", "Czechia")]


@pytest.fixture(scope="module")
def prefs(tmp_path_factory, write_jsonl) -> Path:
    """40 pairs (32 trained, 8 held out with --test-size 8): a city's country chosen, a neighbour's rejected."""
    rows = [{"prompt": f"Country of {city}? ({i})", "chosen": right, "rejected": wrong}
            for i in range(5) for city, right, wrong in CITIES]
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", rows)


def flags(tiny_model_dir, *extra: str) -> list[str]:
    return ["--base", str(tiny_model_dir), "--objective", "dpo", "--batch-size", "8", "--test-size", "8",
            "--precision", "fp32", *extra]


# ---- data ---------------------------------------------------------------------------------------

def test_the_loader_reads_trl_standard_and_conversational_pairs_and_alpaca_ones(tmp_path, write_jsonl):
    system = {"role": "system", "content": "Answer with a country."}
    rows = [
        {"prompt": "Country of Oslo?", "chosen": "Norway", "rejected": "Sweden"},
        {"prompt": [system, {"role": "user", "content": "Country of Rome?"}],
         "chosen": [{"role": "assistant", "content": "Italy"}],
         "rejected": [{"role": "assistant", "content": "Greece"}], "line": 12},  # as RUN/corrections.jsonl
        {"instruction": "Name the country.", "input": "Lisbon", "chosen": "Portugal", "rejected": "Spain"},
        {"prompt": "Country of Paris?", "completion": "France"},  # the other shapes stay as they were
        {"chosen": [system, {"role": "user", "content": "Country of Rome?"}, {"role": "assistant", "content": "Italy"}],
         "rejected": [system, {"role": "user", "content": "Country of Rome?"},
                      {"role": "assistant", "content": "Greece"}]},  # TRL's implicit prompt
    ]
    examples = list(iter_examples(write_jsonl(tmp_path / "mixed.jsonl", rows)))
    assert [(e.messages, e.rejected) for e in examples] == [
        ([{"role": "user", "content": "Country of Oslo?"}, {"role": "assistant", "content": "Norway"}],
         [{"role": "assistant", "content": "Sweden"}]),
        ([system, {"role": "user", "content": "Country of Rome?"}, {"role": "assistant", "content": "Italy"}],
         [{"role": "assistant", "content": "Greece"}]),
        ([{"role": "user", "content": "Name the country.\n\nLisbon"}, {"role": "assistant", "content": "Portugal"}],
         [{"role": "assistant", "content": "Spain"}]),
        ([{"role": "user", "content": "Country of Paris?"}, {"role": "assistant", "content": "France"}], None),
        ([system, {"role": "user", "content": "Country of Rome?"}, {"role": "assistant", "content": "Italy"}],
         [{"role": "assistant", "content": "Greece"}]),
    ]
    assert examples[1].rejected_messages() == [system, {"role": "user", "content": "Country of Rome?"},
                                               {"role": "assistant", "content": "Greece"}]
    assert examples[0].key != examples[3].key
    # A run's split file keeps the pairs (TRL's conversational shape), and reads back the same.
    from tunelab.data.load import write_jsonl as write_split

    write_split(tmp_path / "split.jsonl", examples)
    back = read_jsonl(tmp_path / "split.jsonl")
    assert [(e.messages, e.rejected, e.line) for e in back] == [(e.messages, e.rejected, e.line) for e in examples]
    assert [(e.messages, e.rejected) for e in iter_examples(tmp_path / "split.jsonl")] == \
        [(e.messages, e.rejected) for e in examples]


def test_the_data_check_names_each_malformed_pair_by_line_and_code(tmp_path, write_jsonl):
    answer = [{"role": "assistant", "content": "Norway"}]
    rows = [
        {"prompt": "Country of Oslo?", "chosen": "Norway", "rejected": "Sweden"},  # good
        {"prompt": "Country of Oslo?", "chosen": "Norway", "rejected": " Norway "},
        {"prompt": "Country of Oslo?", "chosen": "Norway"},
        {"prompt": "Country of Oslo?", "chosen": "", "rejected": "Sweden"},
        {"prompt": "Country of Oslo?", "chosen": [{"role": "user", "content": "Norway"}], "rejected": "Sweden"},
        {"prompt": "Country of Oslo?", "chosen": answer * 2, "rejected": "Sweden"},
        {"prompt": [{"role": "user", "content": "Oslo?"}, *answer], "chosen": "Norway", "rejected": "Sweden"},
        {"prompt": "Country of Oslo?", "chosen": "Norway", "rejected": "Sweden", "score": 3},
        {"prompt": "Country of Oslo?", "completion": "Norway", "rejected": "Sweden"},
        {"prompt": "Country of Oslo?", "chosen": "Norway", "rejected": 7},
        {"prompt": "Country of Oslo?", "instruction": "Name it.", "chosen": "Norway", "rejected": "Sweden"},
        {"chosen": answer, "rejected": [{"role": "assistant", "content": "Sweden"}]},  # an implicit prompt of nothing
        {"prompt": "Lima is the capital of?", "chosen": "Peru", "rejected": ""},  # said nothing: a pair
    ]
    report = check(write_jsonl(tmp_path / "bad.jsonl", rows), DataOptions(test_size=0))
    assert [(p.line, p.code) for p in report.errors] == [
        (2, "E_PAIR_IDENTICAL"), (3, "E_PAIR_MISSING"), (4, "E_PAIR_MISSING"), (5, "E_PAIR_ROLE"),
        (6, "E_PAIR_ANSWER"), (7, "E_PAIR_PROMPT"), (8, "E_UNKNOWN_KEY"), (9, "E_PAIR_MISSING"), (10, "E_TYPE"),
        (11, "E_PAIR_PROMPT"), (12, "E_PAIR_PROMPT")]
    assert report.shapes == {"pair": 2}
    assert "'rejected'" in report.errors[1].message and "'chosen'" in report.errors[7].message
    assert "Data check of" in report.table() and "2 preference pairs" in report.table()


def trained_text(tokenizer, encoded) -> str:
    return tokenizer.decode([label for label in encoded.labels if label != IGNORE])


def test_sft_on_pairs_trains_the_prompt_with_the_chosen_answer(tiny_model_dir, prefs, tokenizer):
    prepared = loop.prepare(TrainConfig(base=str(tiny_model_dir), test_size=8), prefs, show=False)
    assert prepared.train_pairs is None and len(prepared.train_encoded) == 32
    chosen = {f"Country of {city}? ({i})": right for i in range(5) for city, right, _ in CITIES}
    for example, encoded in zip(prepared.train, prepared.train_encoded):
        assert trained_text(tokenizer, encoded) == chosen[example.messages[0]["content"]] + "<|im_end|>\n"


# ---- the losses against a hand computation ------------------------------------------------------

def hand_logps(model, encoded) -> float:
    """Summed log-prob of the trained tokens, from one unpacked forward pass of the model's logits."""
    ids = torch.tensor([encoded.input_ids])
    logps = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(logps[t - 1, label].item() for t, label in enumerate(encoded.labels) if label != IGNORE)


def lora_model_and_pairs(tiny_model_dir, prefs, perturb: bool):
    config = TrainConfig(base=str(tiny_model_dir), test_size=8, objective="dpo", precision="fp32")
    prepared = loop.prepare(config, prefs, show=False)
    torch.manual_seed(0)
    model = loop.build_model(config, prepared.base_path)
    if perturb:  # LoRA's B starts at zero, where the adapter changes nothing
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if "lora_B" in name:
                    weight.normal_(0, 0.2)
    return model, prepared.train_pairs[:4], prepared


@pytest.mark.parametrize("perturb", [False, True])
def test_the_dpo_loss_is_the_formula_on_the_models_own_log_probs(tiny_model_dir, prefs, perturb):
    model, pairs, _ = lora_model_and_pairs(tiny_model_dir, prefs, perturb)
    beta = 0.5
    accelerator = make_accelerator(1, "fp32")
    loss, tokens, logged = preference.backward_step(accelerator, model, [preference.collate(pairs)], "dpo", beta)
    with torch.no_grad():
        policy = [(hand_logps(model, p.chosen), hand_logps(model, p.rejected)) for p in pairs]
        with model.disable_adapter():
            reference = [(hand_logps(model, p.chosen), hand_logps(model, p.rejected)) for p in pairs]
    margins = [beta * ((pc - rc) - (pr - rr)) for (pc, pr), (rc, rr) in zip(policy, reference)]
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / len(pairs)
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert logged["reward_margin"] == pytest.approx(sum(margins) / len(pairs), abs=1e-4)
    assert tokens == sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
    if not perturb:  # policy == reference: every pair's loss is log 2
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    else:
        assert abs(loss.item() - math.log(2)) > 1e-3
        assert logged["reward_accuracy"] == sum(m > 0 for m in margins) / len(pairs)
    # The reference is the base model: the adapter switched off gives the base's own log-probs.
    base = load_model(Path(tiny_model_dir))
    with torch.no_grad():
        assert [(hand_logps(base, p.chosen), hand_logps(base, p.rejected)) for p in pairs] == \
            pytest.approx(reference, rel=1e-5)
    # A model that cannot run packed attention takes each sequence alone: the same log-probs.
    with torch.no_grad():
        packed = preference.sequence_logps(model, preference.collate(pairs))
        alone = preference.sequence_logps(model, preference.collate(pairs), packed=False)
    assert torch.allclose(packed[0], alone[0], atol=1e-4) and torch.equal(packed[1], alone[1])
    # The loss reaches the adapter (the only weights a LoRA run trains).
    assert any(w.grad is not None and w.grad.abs().sum() > 0 for n, w in model.named_parameters() if "lora_" in n)


def test_the_orpo_loss_is_the_formula_on_the_models_own_log_probs(tiny_model_dir, prefs):
    model, pairs, _ = lora_model_and_pairs(tiny_model_dir, prefs, perturb=True)
    beta = 0.3
    loss, _, _ = preference.backward_step(make_accelerator(1, "fp32"), model, [preference.collate(pairs)], "orpo", beta)

    def trained(encoded) -> int:
        return sum(label != IGNORE for label in encoded.labels)

    def log_odds(mean: float) -> float:
        return mean - math.log(1 - math.exp(mean))

    with torch.no_grad():
        sides = [(hand_logps(model, p.chosen), trained(p.chosen), hand_logps(model, p.rejected), trained(p.rejected))
                 for p in pairs]
    nll = -sum(c for c, _, _, _ in sides) / sum(n for _, n, _, _ in sides)
    ratio = [F.logsigmoid(torch.tensor(log_odds(c / nc) - log_odds(r / nr), dtype=torch.float64)).item()
             for c, nc, r, nr in sides]
    assert loss.item() == pytest.approx(nll - beta * sum(ratio) / len(pairs), rel=1e-4)


# ---- training -----------------------------------------------------------------------------------

def held_out_margins(run: Path, tiny_model_dir, tokenizer) -> list[float]:
    """(policy - reference) log-prob margin, chosen minus rejected, of each held-out pair of `run`."""
    from peft import PeftModel

    template = Template.load(run / "template.json", tokenizer)
    pairs, _ = preference.encode_pairs(read_jsonl(run / "test.jsonl"), template, TrainConfig(base="x"))
    model = PeftModel.from_pretrained(load_model(Path(tiny_model_dir)), run / "adapter")
    with torch.no_grad():
        policy, _ = preference.sequence_logps(model, preference.collate(pairs))
        with model.disable_adapter():
            reference, _ = preference.sequence_logps(model, preference.collate(pairs))
    half = len(pairs)
    return ((policy[:half] - reference[:half]) - (policy[half:] - reference[half:])).tolist()


@pytest.mark.slow
def test_dpo_raises_the_margin_of_held_out_pairs_with_one_model_in_memory(tmp_path, tiny_model_dir, prefs,
                                                                         tokenizer, monkeypatch):
    from transformers import PreTrainedModel

    alive: list[int] = []
    original = preference.sequence_logps

    def counting(model, batch, packed=True):
        if not alive:  # the first forward pass of training: count the models held (not their inner parts)
            gc.collect()
            models = [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
            inner = {id(part) for m in models for part in m.modules() if part is not m}
            alive.append(sum(id(m) not in inner for m in models))
        return original(model, batch, packed)

    monkeypatch.setattr(preference, "sequence_logps", counting)
    run = tmp_path / "run"
    assert main(["train", str(prefs), "--out", str(run), *flags(tiny_model_dir, "--max-steps", "8", "--lr", "0.02",
                                                                   "--beta", "0.5")]) == 0
    assert alive == [1]  # the reference is the adapter switched off, not a second model
    monkeypatch.undo()
    info = json.loads((run / "run.json").read_text())
    assert (info["objective"], info["beta"], info["method"], info["train_examples"]) == ("dpo", 0.5, "lora", 32)
    steps = [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and steps[0]["reward_margin"] == 0
    assert all({"reward_margin", "reward_accuracy"} <= set(row) for row in steps)
    margins = held_out_margins(run, tiny_model_dir, tokenizer)
    assert len(margins) == 8 and sum(margins) / 8 > 0.1 and sum(m > 0 for m in margins) >= 6, margins


def test_preference_runs_refuse_what_they_cannot_train(tmp_path, tiny_model_dir, prefs, pairs_file, write_jsonl,
                                                       cli):
    result = cli("train", pairs_file, "--out", tmp_path / "a", *flags(tiny_model_dir))
    assert result.returncode == 2 and "no row has one" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [json.loads(line) for line in prefs.read_text().splitlines()]
                        + [{"prompt": "Country of Oslo? (9)", "completion": "Norway"}])
    result = cli("train", mixed, "--out", tmp_path / "b", *flags(tiny_model_dir))
    assert result.returncode == 2 and f"{mixed}:41: no rejected answer" in result.stderr
    result = cli("train", prefs, "--out", tmp_path / "c", *flags(tiny_model_dir, "--method", "full"))
    assert result.returncode == 2 and "--objective dpo needs --method lora" in result.stderr
    assert not (tmp_path / "a" / "config.yaml").exists() and not (tmp_path / "c").exists()
    result = cli("train", prefs, "--out", tmp_path / "d", "--method", "dpo")
    assert result.returncode == 2 and "--method dpo: must be 'lora' or 'full'; for preference tuning pass " \
        "--objective dpo" in result.stderr


@pytest.mark.slow
def test_orpo_trains_a_full_fine_tune(tmp_path, tiny_model_dir, prefs, assert_trained):
    run = tmp_path / "run"
    assert main(["train", str(prefs), "--out", str(run), *flags(tiny_model_dir, "--max-steps", "2"),
                 "--objective", "orpo", "--method", "full"]) == 0
    assert_trained(run)
    assert json.loads((run / "run.json").read_text())["objective"] == "orpo"


@pytest.mark.slow
def test_a_dpo_run_killed_mid_run_resumes_to_the_uninterrupted_one(tmp_path, tiny_model_dir, prefs, cli):
    from test_checkpoint import assert_same_run, complete, kill_when, resume, start

    # 32 pairs in micro-batches of 4, 3 per step: the last step of an epoch is short, so step 4 is
    # in the second epoch; dropout draws from the global RNG.
    run_flags = flags(tiny_model_dir, "--batch-size", "4", "--grad-accum", "3", "--max-steps", "5", "--lr", "0.01",
                      "--lora-dropout", "0.1", "--save-every", "2")
    assert main(["train", str(prefs), "--out", str(tmp_path / "reference"), *run_flags]) == 0
    out = tmp_path / "run"
    kill_when(start(prefs, out, run_flags), complete(out, 2))
    log = resume(cli, prefs, out, run_flags)
    assert "step 2" in log or "checkpoint" in log
    assert_same_run(out, tmp_path / "reference")
