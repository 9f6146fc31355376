"""`tunelab export`: merged Hugging Face folders, GGUF files and Ollama Modelfiles from tiny runs,
read back by transformers (and by llama.cpp when llama-cpp-python is installed)."""

import copy
import json
import re
import shutil

import pytest
import torch

import tunelab
from tunelab.cli import main
from tunelab.errors import UserError
from tunelab.export.gguf import check_gguf_supported
from tunelab.export.ollama import ollama_modelfile
from tunelab.run import Run
from tunelab.template import Template

SAMPLE_TEXT = "In 2024, 3.14 people said <|im_start|>héllo wörld! 你好\n\n  spaced   out"
CONVERSATIONS = [
    [{"role": "user", "content": "Country of Paris?"}],
    [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Country of Rome?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Country of Oslo?\nOne word."}],
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, write_jsonl):
    """A LoRA run (model template, evaluated) and a full run (alpaca template) on the tiny Llama."""
    folder = tmp_path_factory.mktemp("export-runs")
    cities = [("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy")]
    data = write_jsonl(folder / "pairs.jsonl", [{"prompt": f"Country of {c}? ({i})", "completion": k}
                                                 for i in range(5) for c, k in cities])
    lora = tunelab.finetune(data, out=folder / "lora", base=str(tiny_model_dir), method="lora", max_steps=3,
                            batch_size=4, test_size=4, lr=0.01)
    lora.evaluate(limit=2, include_base=False, max_new_tokens=4)
    tunelab.finetune(data, out=folder / "full", base=str(tiny_model_dir), method="full", max_steps=2,
                     batch_size=4, test_size=4, template="alpaca")
    return {"lora": folder / "lora", "full": folder / "full"}


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def sample_ids(run: Run) -> list[int]:
    return run.template.encode_prompt(CONVERSATIONS[2])


def leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_merged_lora_is_a_transformers_folder_with_the_run_template(runs, tmp_path, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["export", str(runs["lora"]), "--format", "merged", "--out", str(out)]) == 0
    assert str(out / "README.md") in capsys.readouterr().out
    assert out.stat().st_mode & 0o777 == 0o755
    run = Run(runs["lora"])
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = sample_ids(run)
    assert torch.allclose(logits(model, ids), logits(run.model(), ids), atol=1e-5)
    assert (logits(model, ids) - logits(run.base_model(), ids)).abs().max() > 1e-3  # the LoRA was folded in
    # Tied embeddings stay tied: one tensor in the file and in the loaded model.
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if k.startswith("lm_head")]  # noqa: SIM118 - safe_open is not iterable
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert set(run.template.stop_token_ids) <= set(model.generation_config.eos_token_id)

    tokenizer = AutoTokenizer.from_pretrained(out)
    for conversation in CONVERSATIONS:
        rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert rendered == run.template.render(conversation, add_generation_prompt=True)
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert list(ids) == run.template.encode_prompt(conversation)

    card = (out / "README.md").read_text()
    assert str(run.info["base"]) in card and "LoRA (rank 16" in card
    assert "16 training and 4 held-out examples" in card and "20 rows, 20 valid" in card
    assert "3 steps of 4 examples, peak learning rate 0.01" in card
    assert "on 2 held-out examples" in card and "exact match" in card  # from eval.json
    assert run.template.source in card
    # The card's own Python snippet runs and answers as `tunelab generate` does (shortened: the
    # tiny model never stops by itself).
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "max_new_tokens=256" in snippet
    capsys.readouterr()
    exec(snippet.replace("max_new_tokens=256", "max_new_tokens=24"), {})
    assert capsys.readouterr().out.strip() == run.generate("...", max_new_tokens=24)


@pytest.mark.slow
def test_merged_full_run_in_f16(runs, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "merged16"
    assert main(["export", str(runs["full"]), "--format", "merged", "--out", str(out), "--dtype", "f16"]) == 0
    assert AutoConfig.from_pretrained(out).dtype == torch.float16
    run = Run(runs["full"])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = sample_ids(run)
    assert (logits(model, ids) - logits(run.model(), ids)).abs().max() < 1e-2
    card = (out / "README.md").read_text()
    assert "full fine-tuning" in card and "Not evaluated" in card and "`alpaca`" in card


def gguf_fields(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()
              if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")}
    fields["tensors"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields


@pytest.mark.slow
def test_gguf_reads_back_with_the_merged_logits_and_the_same_tokenizer(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "gguf"
    assert main(["export", str(runs["lora"]), "--format", "gguf", "--out", str(out), "--dtype", "f32"]) == 0
    run = Run(runs["lora"])
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    ids = sample_ids(run)
    assert (logits(model, ids) - logits(run.model(), ids)).abs().max() < 1e-2

    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    assert tokenizer(SAMPLE_TEXT)["input_ids"] == run.tokenizer(SAMPLE_TEXT)["input_ids"]
    assert tokenizer.chat_template == run.template.source

    fields = gguf_fields(out / "model.gguf")
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eot_token_id"] == run.template.stop_token_ids[0]
    assert fields["tokenizer.ggml.eos_token_id"] == run.tokenizer.eos_token_id
    assert fields["tokenizer.ggml.bos_token_id"] == run.tokenizer.bos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == run.tokenizer.pad_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    im_end = run.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.token_type"][im_end] == 3  # CONTROL
    assert "output.weight" not in fields["tensors"]  # tied: llama.cpp reuses token_embd
    assert set(fields["tensors"].values()) == {"F32"}


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tolerance", [("f16", 2e-2), ("q8_0", 1e-1)])
def test_gguf_f16_and_q8_0(runs, tmp_path, dtype, tolerance):
    from transformers import AutoModelForCausalLM

    out = tmp_path / dtype
    assert main(["export", str(runs["full"]), "--format", "gguf", "--out", str(out), "--dtype", dtype]) == 0
    types = gguf_fields(out / "model.gguf")["tensors"]
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == dtype.upper()
    run = Run(runs["full"])
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    ids = sample_ids(run)
    assert (logits(model, ids) - logits(run.model(), ids)).abs().max() < tolerance
    assert "llama-cli -m" in (out / "README.md").read_text()


def go_render(template: str, messages: list[dict]) -> str:
    """A small interpreter of Go's text/template, for what Modelfile templates use: text,
    `range $i, $m := .Messages`, `if`/`else if`/`else`/`end`, string and integer literals, `$m.Role`-style
    fields, `$.Messages`, and the functions eq, ne, and, len and slice."""
    tokens = re.split(r"(\{\{-?\s*(?:\"(?:[^\"\\]|\\.)*\"|[^}\"])*?\s*-?\}\})", template)

    def parse(position: int, stops: tuple) -> tuple[list, int, str | None]:
        nodes = []
        while position < len(tokens):
            token = tokens[position]
            position += 1
            if not token.startswith("{{"):
                nodes.append(("text", token))
                continue
            action = token.strip("{}-").strip()
            if action.split(" ")[0] in stops or action.startswith("else"):
                return nodes, position, action
            if action.startswith("range "):
                names, source = action[len("range "):].split(":=")
                body, position, _ = parse(position, ("end",))
                nodes.append(("range", [n.strip() for n in names.split(",")], source.strip(), body))
            elif action.startswith("if "):
                branches = []
                condition = action[len("if "):]
                while True:
                    body, position, closer = parse(position, ("end",))
                    branches.append((condition, body))
                    if closer == "end":
                        break
                    condition = closer[len("else if "):] if closer.startswith("else if ") else "true"
                nodes.append(("if", branches))
            else:
                nodes.append(("value", action))
        return nodes, position, None

    def lex(expression: str) -> list:
        words = re.findall(r"\"(?:[^\"\\]|\\.)*\"|\(|\)|[^\s()]+", expression)
        stack: list[list] = [[]]
        for word in words:
            if word == "(":
                stack.append([])
            elif word == ")":
                inner = stack.pop()
                stack[-1].append(inner)
            else:
                stack[-1].append(word)
        return stack[0]

    functions = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda *v: all(v),
                 "len": len, "slice": lambda seq, start: seq[start:]}

    def evaluate(terms: list, scope: dict):
        if isinstance(terms[0], str) and terms[0] in functions:
            return functions[terms[0]](*(value(t, scope) for t in terms[1:]))
        return value(terms[0], scope)

    def value(term, scope: dict):
        if isinstance(term, list):
            return evaluate(term, scope)
        if term.startswith('"'):
            return json.loads(term)
        if term == "true":
            return True
        if term.isdigit():
            return int(term)
        variable, *fields = term.split(".")
        current = scope[variable or "."] if variable != "$" else scope["$"]
        for field in fields:
            current = current[field.lower()] if field in ("Role", "Content") else current[field]
        return current

    def run_nodes(nodes: list, scope: dict) -> str:
        text = ""
        for node in nodes:
            if node[0] == "text":
                text += node[1]
            elif node[0] == "value":
                text += str(evaluate(lex(node[1]), scope))
            elif node[0] == "range":
                for index, item in enumerate(value(node[2], scope)):
                    text += run_nodes(node[3], {**scope, node[1][0]: index, node[1][1]: item, ".": item})
            else:
                for condition, body in node[1]:
                    if evaluate(lex(condition), scope):
                        text += run_nodes(body, scope)
                        break
        return text

    root = {"Messages": messages}
    return run_nodes(parse(0, ())[0], {"$": root, ".": root})


def modelfile_parts(text: str) -> dict:
    return {
        "from": re.search(r"^FROM (.+)$", text, re.M).group(1),
        "template": re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1),
        "system": (m.group(1) if (m := re.search(r'^SYSTEM """(.*?)"""$', text, re.M | re.S)) else None),
        "stops": [json.loads(v) for v in re.findall(r"^PARAMETER stop (.+)$", text, re.M)],
    }


def as_ollama_sends(messages: list[dict], system: str | None) -> list[dict]:
    """Ollama puts the Modelfile's SYSTEM first when a conversation has no system message."""
    if system is not None and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


@pytest.mark.slow
def test_ollama_modelfile_renders_the_run_template(runs, tmp_path, capsys):
    out = tmp_path / "ollama"
    assert main(["export", str(runs["lora"]), "--format", "ollama", "--out", str(out)]) == 0
    assert f"ollama create ollama -f {out / 'Modelfile'}" in capsys.readouterr().out
    run = Run(runs["lora"])
    parts = modelfile_parts((out / "Modelfile").read_text())
    assert gguf_fields(out / parts["from"])["tensors"]["blk.0.attn_q.weight"] == "F16"  # the default
    assert parts["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert parts["stops"] == ["<|im_end|>"]
    for conversation in CONVERSATIONS:
        rendered = go_render(parts["template"], as_ollama_sends(conversation, parts["system"]))
        assert rendered == run.template.render(conversation, add_generation_prompt=True)
    assert "ollama create ollama -f" in (out / "README.md").read_text()


@pytest.mark.parametrize("name", ["auto", "chatml", "alpaca", "plain"])
def test_modelfile_template_for_each_named_template(tokenizer, name):
    template = Template.for_model(tokenizer, name)
    parts = modelfile_parts(ollama_modelfile(template))
    for conversation in CONVERSATIONS:
        rendered = go_render(parts["template"], as_ollama_sends(conversation, parts["system"]))
        assert rendered == template.render(conversation, add_generation_prompt=True)


def test_modelfile_refuses_a_template_that_merges_the_system_prompt_into_a_turn(tokenizer):
    llama2 = ("{% for message in messages %}{% if message['role'] == 'system' %}{% set system = message['content'] %}"
              "{% elif message['role'] == 'user' %}{{ '[INST] ' }}{% if system is defined and loop.index0 == 1 %}"
              "{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}{{ message['content'] + ' [/INST] ' }}"
              "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{% endfor %}")
    with pytest.raises(UserError, match="cannot be written as an Ollama TEMPLATE"):
        ollama_modelfile(Template(tokenizer, "llama2-like", llama2))


# Llama 3's split, as its tokenizer.json writes it.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def test_pre_tokenizer_names_and_refusal(tiny_model_dir, tokenizer):
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert check_gguf_supported(config, tokenizer) == "gpt-2"
    smollm = copy.deepcopy(tokenizer)
    smollm.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert check_gguf_supported(config, smollm) == "smollm"
    llama3 = copy.deepcopy(tokenizer)
    llama3.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert check_gguf_supported(config, llama3) == "llama-bpe"
    words = copy.deepcopy(tokenizer)
    words.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UserError, match="byte-level BPE"):
        check_gguf_supported(config, words)


@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys):
    no_weights = tmp_path / "no-weights"
    shutil.copytree(runs["lora"], no_weights, ignore=shutil.ignore_patterns("adapter"))
    mistral = tmp_path / "mistral"
    shutil.copytree(runs["full"], mistral)
    config = json.loads((mistral / "model" / "config.json").read_text())
    (mistral / "model" / "config.json").write_text(json.dumps({**config, "model_type": "mistral",
                                                               "architectures": ["MistralForCausalLM"]}))
    existing = tmp_path / "existing"
    existing.mkdir()
    out = str(tmp_path / "out")
    cases = [
        ([str(no_weights), "--format", "gguf", "--out", out], "no trained weights"),
        ([str(runs["lora"]), "--format", "onnx", "--out", out], "unknown export format 'onnx'"),
        ([str(runs["lora"]), "--format", "merged", "--out", str(existing)], "already exists"),
        ([str(runs["lora"]), "--format", "merged", "--out", out, "--dtype", "q8_0"], "--dtype q8_0 is not available"),
        ([str(runs["lora"]), "--format", "gguf", "--out", out, "--dtype", "bf16"], "--dtype bf16 is not available"),
        ([str(mistral), "--format", "gguf", "--out", out], "supports the Llama architecture"),
    ]
    for args, message in cases:
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("tunelab: error: ")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "mistral", "no-weights"]


@pytest.mark.slow
def test_an_export_that_fails_midway_leaves_nothing(runs, tmp_path, monkeypatch):
    import tunelab.export.gguf

    def broken(model, tokenizer, template, path, *args, **kwargs):
        path.write_bytes(b"GGUF half")
        raise OSError("disk full")

    monkeypatch.setattr(tunelab.export.gguf, "write_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        main(["export", str(runs["lora"]), "--format", "gguf", "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_llama_cpp_answers_like_tunelab_generate(tmp_path, tiny_model_dir, write_jsonl):
    """llama.cpp itself (through llama-cpp-python) loads the GGUF, tokenizes the run's prompts as
    tunelab does and answers the held-out prompts with the same greedy text. The run is trained
    until it answers in words: the few-step runs above answer empty lines, which would match
    trivially."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tunelab.data.load import read_jsonl

    cities = [("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy")]
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Country of {c}? ({i})", "completion": k}
                                                  for i in range(10) for c, k in cities])
    tunelab.finetune(data, out=tmp_path / "run", base=str(tiny_model_dir), method="full", max_steps=120,
                     batch_size=4, test_size=4, lr=0.003, seed=1)
    out = tmp_path / "gguf"
    assert main(["export", str(tmp_path / "run"), "--format", "gguf", "--out", str(out), "--dtype", "f32"]) == 0
    run = Run(tmp_path / "run")
    conversations = [e.prompt_messages() for e in read_jsonl(run.files.test)]
    expected = run.generate_batch(conversations, max_new_tokens=12)
    assert all(answer for answer in expected), expected
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=256, verbose=False, seed=0)
    for conversation, answer in zip(conversations, expected):
        rendered = run.template.render(conversation, add_generation_prompt=True)
        tokens = llm.tokenize(rendered.encode(), add_bos=False, special=True)
        assert tokens == run.template.encode_prompt(conversation)
        completion = llm.create_completion(tokens, max_tokens=12, temperature=0.0)
        assert completion["choices"][0]["text"].strip() == answer


@pytest.mark.parametrize("where", ["loading the model", "writing the export"])
def test_ctrl_c_exits_130_with_one_line_and_leaves_nothing(runs, tmp_path, monkeypatch, capsys, where):
    import tunelab.export.merged

    def interrupted(*args, **kwargs):
        if where == "writing the export":
            (args[3] / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    if where == "loading the model":
        monkeypatch.setattr(Run, "model", interrupted)
    else:
        monkeypatch.setattr(tunelab.export.merged, "write_merged", interrupted)
    out = tmp_path / "out"
    assert main(["export", str(runs["lora"]), "--format", "merged", "--out", str(out)]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tunelab")]  # no progress bars
    assert len(err) == 1 and err[0].startswith(f"tunelab: interrupted: nothing was written to {out}"), err
    assert ("was removed" in err[0]) == (where == "writing the export")
    assert list(tmp_path.iterdir()) == []


def test_the_next_export_removes_what_an_export_killed_outright_left(runs, tmp_path, capsys):
    """kill -9 half way through the writing, then export again into the same folder: the dead
    export's staging folder is reported and removed; a running export's folder is left alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    exports = tmp_path / "exports"
    exports.mkdir()
    hang = ("import sys, time\n"
            "import tunelab.export.merged as merged\n"
            "from tunelab.cli import main\n"
            "write = merged.write_merged\n"
            "def write_then_hang(model, tokenizer, template, folder, dtype):\n"
            "    write(model, tokenizer, template, folder, dtype)\n"
            "    (folder / 'hanging').touch()\n"
            "    time.sleep(600)\n"
            "merged.write_merged = write_then_hang\n"
            "sys.exit(main(sys.argv[1:]))\n")
    process = subprocess.Popen([sys.executable, "-c", hang, "export", str(runs["lora"]), "--format", "merged",
                                "--out", str(exports / "first")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = exports / f".first.tunelab-export-{process.pid}"
    deadline = time.monotonic() + 120
    while not (staging / "hanging").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (staging / "model.safetensors").exists() and not (exports / "first").exists()
    running = exports / f".other.tunelab-export-{os.getppid()}"  # a live process's
    running.mkdir()
    unrelated = exports / ".first.tunelab-export-notapid"
    unrelated.mkdir()

    assert main(["export", str(runs["lora"]), "--format", "merged", "--out", str(exports / "second")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tunelab")]
    assert err == [f"tunelab: removed {staging}, a half-written export left by process {process.pid}, which is gone"]
    assert sorted(p.name for p in exports.iterdir()) == sorted([running.name, unrelated.name, "second"])
