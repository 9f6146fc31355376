"""Generation: answers in input order as soon as they are made, on standard output or in a file;
Ctrl-C says how far it got, and stops a chat reply at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from tunelab.decoding.generate import Request, generate_answers, generate_batch, generate_rows


def prompts(n: int) -> list[list[dict[str, str]]]:
    """Conversations of very different lengths, so batches need left padding."""
    return [[{"role": "user", "content": f"Question {i}: " + "tell me more " * (i * 7 % 23)}] for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A random 2-layer Llama with large weights: its greedy answers differ from prompt to prompt
    (the trained tiny run answers nearly everything with blank lines)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.template import Template

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval(), Template.for_model(tokenizer)


@pytest.fixture(scope="module")
def to_standard_output(tiny_run, tmp_path_factory, write_jsonl):
    """`tunelab generate RUN --input FILE`, the README's form, once for the tests below, in a new
    process: library warnings that show once per process would not show in this one again."""
    folder = tmp_path_factory.mktemp("generate")
    rows = [{"prompt": "Country of Paris?", "completion": "not used"}, {"instruction": "Country of Rome?"},
            {"messages": [{"role": "user", "content": "Country of Oslo?"}]}]
    inputs = write_jsonl(folder / "prompts.jsonl", rows)
    command = [sys.executable, "-m", "tunelab.cli", "generate", str(tiny_run), "--input", str(inputs),
               "--max-new-tokens", "6"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300), inputs


@pytest.mark.slow
def test_answers_go_to_standard_output_in_input_order(to_standard_output, tiny_run, tmp_path, cli):
    result, inputs = to_standard_output
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["line"] for a in answers] == [1, 2, 3]
    assert "3 answers written to standard output" in result.stderr
    # The same answers as in a file, and as the Python API gives them.
    assert cli("generate", tiny_run, "--input", inputs, "--max-new-tokens", "6", "--output",
               tmp_path / "answers.jsonl").returncode == 0
    assert (tmp_path / "answers.jsonl").read_text() == result.stdout
    # A .txt file of the same prompts, one a line (blank lines skipped, as in `tunelab data label`).
    text = tmp_path / "prompts.txt"
    text.write_text("Country of Paris?\n\nCountry of Rome?\nCountry of Oslo?\n")
    from_text = cli("generate", tiny_run, "--input", text, "--max-new-tokens", "6")
    assert from_text.returncode == 0, from_text.stderr
    assert [json.loads(line)["line"] for line in from_text.stdout.splitlines()] == [1, 3, 4]
    assert [json.loads(line)["answer"] for line in from_text.stdout.splitlines()] == [a["answer"] for a in answers]


@pytest.mark.slow
def test_generate_shows_no_library_warnings(to_standard_output):
    result, _ = to_standard_output
    assert result.returncode == 0
    assert not [line for line in result.stderr.splitlines() if "Warning" in line], result.stderr


@pytest.mark.slow
def test_batched_answers_equal_one_by_one_answers_in_input_order(tiny):
    model, template = tiny
    conversations = prompts(11)
    alone = [generate_batch(model, template, [c], max_new_tokens=5)[0] for c in conversations]
    # Batches of 2 in windows of 8: sorting by length inside a window must not reorder answers.
    assert list(generate_answers(model, template, conversations, max_new_tokens=5, batch_size=2)) == alone
    assert len(set(alone)) == len(alone)  # the prompts really get different answers


@pytest.mark.slow
def test_answers_longer_than_the_caches_room_equal_transformers_generate(tiny):
    """The cache keeps room for the next tokens and moves to a larger buffer when it runs out:
    an answer that crosses that move several times is transformers' own greedy answer."""
    from tunelab.decoding.generate import ROOM

    model, template = tiny
    ids = torch.tensor([template.encode_prompt(prompts(3)[2])])
    length = 3 * ROOM
    expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length,
                              min_new_tokens=length, do_sample=False, pad_token_id=template.tokenizer.pad_token_id)
    [answer] = generate_rows(model, template, [Request(ids[0].tolist(), length, stop_strings=["never in it"])])
    expected_text = template.tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert answer.generated_tokens == length and answer.text == expected_text


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_generation_computes_in_the_precision_asked(tiny, precision):
    from tunelab.device import computes_bf16

    model, template = tiny
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda module, i, out: seen.append(out.dtype))
    try:
        generate_rows(model, template, [Request(template.encode_prompt(c), 3) for c in prompts(2)], precision)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16 if computes_bf16(precision, model.device) else torch.float32}
    # Weights stay as they were: the arithmetic changes, not the model.
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="precision 'BF16': choose one of auto, fp32, bf16"):
        generate_rows(model, template, [Request(template.encode_prompt(prompts(1)[0]), 3)], "BF16")


def test_a_lora_runs_weights_are_cast_to_bf16_once_a_batch_not_at_every_step(tiny_run):
    """bf16 autocast keeps a weight's cast only if the weight requires grad; a LoRA run's merged
    model would otherwise be cast again at every decoding step. The generation loop unfreezes
    the weights for a batch only: the model a user holds stays frozen, so a forward pass
    outside no_grad builds no graph over them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tunelab.run import Run

    run = Run(tiny_run)
    model = run.model()
    assert not any(p.requires_grad for p in model.parameters())
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.grad_fn is None
    weights = {p.data_ptr() for p in model.parameters() if p.dim() == 2}
    casts = []

    class CountCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in weights:
                casts.append(args[0].data_ptr())
            return func(*args, **(kwargs or {}))

    prompt = run.template.encode_prompt([{"role": "user", "content": "Country of Paris?"}])
    with CountCasts():
        [answer] = generate_rows(model, run.template, [Request(prompt, 4, stop_strings=["never in it"])], "bf16")
    assert answer.generated_tokens == 4  # four forward passes
    assert casts and len(casts) == len(set(casts))  # each weight once, not once per forward pass
    assert not any(p.requires_grad for p in model.parameters())


def test_precision_flag_reaches_generation(tiny_run, monkeypatch, capsys):
    import tunelab.decoding.generate as generate
    from tunelab.cli import main
    from tunelab.run import Run

    asked = []
    real = generate.autocast
    monkeypatch.setattr(generate, "autocast", lambda precision, device: asked.append(precision) or real(precision,
                                                                                                       device))
    # tunelab generate RUN --prompt TEXT --precision fp32
    assert main(["generate", str(tiny_run), "--prompt", "Country of Paris?", "--max-new-tokens", "2",
                 "--precision", "fp32"]) == 0
    assert asked and set(asked) == {"fp32"}
    asked.clear()
    assert main(["generate", str(tiny_run), "--prompt", "Country of Paris?", "--max-new-tokens", "2"]) == 0
    assert set(asked) == {Run(tiny_run).config.precision}  # by default, the precision the run trained with
    # tunelab chat RUN --precision bf16: one question, then end of input
    asked.clear()
    typed = iter(["Country of Paris?"])

    def read_line(prompt: str = "") -> str:
        line = next(typed, None)
        if line is None:
            raise EOFError
        return line

    monkeypatch.setattr("builtins.input", read_line)
    assert main(["chat", str(tiny_run), "--max-new-tokens", "2", "--precision", "bf16"]) == 0
    assert asked and set(asked) == {"bf16"}
    # tunelab serve RUN --precision fp32: the option reaches the server's runs (load_served reads it)
    import tunelab.serve.app

    options = []
    monkeypatch.setattr(tunelab.serve.app, "serve", options.append)
    assert main(["serve", str(tiny_run), "--precision", "fp32"]) == 0
    assert options[0].precision == "fp32"
    # The Python API names a mistaken precision rather than computing in fp32 without a word.
    import tunelab
    from tunelab.errors import UserError

    with pytest.raises(UserError, match="precision 'half': choose one of auto, fp32, bf16"):
        tunelab.load(tiny_run, precision="half")


@pytest.mark.slow
def test_input_is_read_one_window_at_a_time(tiny):
    model, template = tiny
    taken = []

    def source():
        for conversation in prompts(40):
            taken.append(conversation)
            yield conversation

    answers = generate_answers(model, template, source(), max_new_tokens=1, batch_size=2)
    next(answers)
    assert len(taken) == 8  # one window of 4 batches of 2, not the whole input
    assert len(list(answers)) == 39 and len(taken) == 40


def test_a_set_cancel_event_ends_its_row_after_one_token_and_the_others_go_on(tiny):
    model, template = tiny
    conversations = prompts(3)
    cancel = threading.Event()
    cancel.set()
    requests = [Request(template.encode_prompt(c), 20, cancel=cancel if i == 1 else None)
                for i, c in enumerate(conversations)]
    answers = generate_rows(model, template, requests)
    assert (answers[1].generated_tokens, answers[1].finish_reason) == (1, "cancelled")
    assert [a.text for a in answers[::2]] == [generate_batch(model, template, [c], 20)[0] for c in conversations[::2]]


def _read_until(process: subprocess.Popen, output: list[str], condition) -> None:
    """Wait for the process's output (collected in `output` by a reader thread) to meet `condition`."""
    deadline = time.monotonic() + 240  # a safety net against a hung process, not a measurement
    while not condition("".join(output)):
        assert process.poll() is None or condition("".join(output)), "".join(output)
        assert time.monotonic() < deadline, "".join(output)
        time.sleep(0.02)


def _start(args: list, stdin: bool = False) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    process = subprocess.Popen([sys.executable, "-m", "tunelab.cli", *map(str, args)], text=True, bufsize=1,
                               stdin=subprocess.PIPE if stdin else None, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    output: list[str] = []

    def read() -> None:
        while piece := process.stdout.read(1):
            output.append(piece)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return process, output, reader


@pytest.mark.slow
def test_interrupted_generate_keeps_every_answer_written_and_says_how_far(tiny_run, tmp_path, write_jsonl):
    rows = [{"prompt": f"Question {i}"} for i in range(64)]  # one window: the first batch leaves first
    inputs = write_jsonl(tmp_path / "prompts.jsonl", rows)
    process, output, reader = _start(["generate", tiny_run, "--input", inputs, "--max-new-tokens", "300"])
    _read_until(process, output, lambda text: text.count("\n") >= 1)
    process.send_signal(signal.SIGINT)
    stderr = process.stderr.read()  # not communicate(): it would take standard output from the reader
    process.wait(timeout=240)
    reader.join(timeout=30)  # the last answers may still be in the pipe when the process has ended
    lines = "".join(output).splitlines()
    assert process.returncode == 130
    assert 1 <= len(lines) < 64
    assert [json.loads(line)["line"] for line in lines] == list(range(1, len(lines) + 1))
    assert f"tunelab: interrupted: {len(lines)} of 64 answers written to standard output" in stderr
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_ctrl_c_stops_a_chat_reply_and_the_chat_goes_on(tiny_run):
    process, output, _ = _start(["chat", tiny_run, "--max-new-tokens", "5000"], stdin=True)

    def replying(turn: int):
        return lambda text: text.count("model> ") == turn and len(text.rsplit("model> ", 1)[-1]) >= 3

    for turn, question in enumerate(["Tell me everything.", "And now?"], start=1):
        process.stdin.write(question + "\n")
        process.stdin.flush()
        _read_until(process, output, replying(turn))  # far from its 5000 tokens
        process.send_signal(signal.SIGINT)
        _read_until(process, output, lambda text, turn=turn: text.count("[stopped]\nyou> ") == turn)
    process.stdin.close()  # Ctrl-D leaves
    process.wait(timeout=240)
    stderr = process.stderr.read()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr


def _one_by_one(model, template, conversation, max_new_tokens):
    ids = torch.tensor([template.encode_prompt(conversation)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=template.stop_token_ids,
                             pad_token_id=template.tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.slow
def test_rows_that_stop_leave_the_batch_and_the_shared_prefix_is_reused(tiny):
    import copy

    from tunelab.decoding.generate import generate_detailed

    model, shared = tiny
    template = copy.copy(shared)
    shots = [{"role": "user", "content": "Country of Rome?"}, {"role": "assistant", "content": "Italy"}]
    conversations = [shots + [{"role": "user", "content": f"Country of {city}?" + " please" * i}]
                     for i, city in enumerate(["Paris", "Berlin", "Oslo", "Madrid", "Lisbon", "Vienna", "Bern"])]
    # Make a token that some answers produce early an end-of-turn token, so rows finish at
    # different steps and leave the batch while others go on.
    free = [_one_by_one(model, template, c, 12) for c in conversations]
    template.stop_token_ids = [free[0][3], *template.stop_token_ids]
    expected = [_one_by_one(model, template, c, 12) for c in conversations]
    stops = set(template.stop_token_ids)
    assert len({len(e) for e in expected}) > 1  # rows of different lengths

    answers = list(generate_detailed(model, template, conversations, max_new_tokens=12, batch_size=3))
    for answer, tokens, conversation in zip(answers, expected, conversations):
        text = template.tokenizer.decode([t for t in tokens if t not in stops], skip_special_tokens=True).strip()
        assert answer.text == text
        assert answer.generated_tokens == len(tokens)
        assert answer.stopped == (tokens[-1] in stops)
        assert answer.prompt_tokens == len(template.encode_prompt(conversation))


def test_greedy_rows_equal_transformers_generate_for_prompts_of_different_lengths(tiny):
    """The loop's greedy tokens are transformers' own, in one batch with left padding, a shared
    prefix and different token limits."""
    model, template = tiny
    system = [{"role": "system", "content": "Answer briefly."}]
    conversations = [system + c for c in prompts(6)]
    limits = [9, 3, 14, 1, 9, 6]
    expected = [_one_by_one(model, template, c, n) for c, n in zip(conversations, limits)]
    assert len({len(template.encode_prompt(c)) for c in conversations}) == 6
    answers = generate_rows(model, template, [Request(template.encode_prompt(c), n)
                                              for c, n in zip(conversations, limits)])
    stops = set(template.stop_token_ids)
    for answer, tokens in zip(answers, expected):
        assert answer.generated_tokens == len(tokens)
        assert answer.text == template.tokenizer.decode([t for t in tokens if t not in stops],
                                                        skip_special_tokens=True).strip()
        assert answer.finish_reason == ("stop" if tokens[-1] in stops else "length")


@pytest.mark.slow
def test_sampling_repeats_with_a_seed_whatever_shares_the_batch(tiny):
    model, template = tiny
    prompt = template.encode_prompt(prompts(3)[2])
    seeded = Request(prompt, 12, temperature=1.0, top_p=0.9, seed=7)
    alone = generate_rows(model, template, [seeded])[0]
    others = [Request(template.encode_prompt(c), 12) for c in prompts(2)]
    beside = generate_rows(model, template, [others[0], seeded, others[1]])[1]
    assert beside.text == alone.text
    draws = {generate_rows(model, template, [Request(prompt, 12, temperature=1.0, seed=s)])[0].text
             for s in range(4)}
    assert len(draws) > 1  # the seed matters: sampling really samples
    greedy = generate_rows(model, template, [Request(prompt, 12)])[0].text
    assert generate_rows(model, template, [Request(prompt, 12, temperature=1.0, top_p=1e-6, seed=3)])[0].text == greedy


def test_stop_strings_cut_the_answer_and_streamed_pieces_join_to_it(tiny):
    model, template = tiny
    conversations = prompts(4)
    free = generate_batch(model, template, conversations, max_new_tokens=16)
    stop = free[1][4:7]
    assert len(free[1]) > 8 and stop.strip()
    pieces: list[list[str]] = [[] for _ in conversations]
    requests = [Request(template.encode_prompt(c), 16, stop_strings=[stop], on_text=pieces[i].append)
                for i, c in enumerate(conversations)]
    answers = generate_rows(model, template, requests)
    for answer, text, sent in zip(answers, free, pieces):
        assert answer.text == (text[: text.index(stop)].strip() if stop in text else text)
        if stop in text:
            assert answer.finish_reason == "stop"
        assert "".join(sent) == answer.text
        assert not any("\ufffd" in piece for piece in sent)
    assert answers[1].finish_reason == "stop" and answers[1].generated_tokens < 16


def test_streamed_text_never_splits_a_character(tiny):
    """A token that holds only the first bytes of a character is held back until the character
    is whole."""
    model, template = tiny
    tokenizer = template.tokenizer
    emoji = tokenizer.encode("\U0001F600", add_special_tokens=False)
    assert len(emoji) > 1  # byte-level tokens: one character in several tokens
    forced = emoji + tokenizer.encode(" done", add_special_tokens=False)

    class Forced(torch.nn.Module):
        """The tiny model, made to answer `forced` token by token."""

        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, input_ids, cache, **kwargs):
            out = self.inner(input_ids=input_ids, cache=cache, **kwargs)
            step = cache.get_seq_length() - prompt_length
            out.logits[:, -1, forced[min(step, len(forced) - 1)]] = 1e9
            return out

    prompt = template.encode_prompt(prompts(1)[0])
    prompt_length = len(prompt)  # after the prefill, the cache holds the prompt: step 0
    sent: list[str] = []
    answer = generate_rows(Forced(), template, [Request(prompt, len(forced), on_text=sent.append)])[0]
    assert answer.text == "\U0001F600 done"
    assert "".join(sent) == answer.text
    assert all("\ufffd" not in piece for piece in sent)


def test_a_ctrl_c_while_an_answer_is_written_comes_after_its_count():
    from tunelab.cli import ctrl_c_held

    handler, done = signal.getsignal(signal.SIGINT), []
    with pytest.raises(KeyboardInterrupt), ctrl_c_held():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("written and counted")
    assert done == ["written and counted"]
    assert signal.getsignal(signal.SIGINT) is handler
