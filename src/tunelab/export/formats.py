"""Export a finished run to where people run models, with a model card (README.md) in each:

    tunelab export RUN --format merged --out DIR   a Hugging Face folder: LoRA folded into the base,
                                                   safetensors, tokenizer with the run's chat template
    tunelab export RUN --format gguf --out DIR     DIR/model.gguf for llama.cpp: weights, tokenizer
                                                   and the run's chat template in its metadata
    tunelab export RUN --format ollama --out DIR   the GGUF and a Modelfile whose TEMPLATE, SYSTEM and
                                                   stop parameters render the run's template

Everything that can refuse (an existing --out, a run without weights, an architecture or
tokenizer GGUF cannot describe, a template Ollama cannot express) is checked before anything
is written; the export is then written into a hidden folder beside --out and renamed when
complete, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError
from tunelab.template import Template

FORMATS = ("merged", "gguf", "ollama")
DTYPES = ("f32", "f16", "q8_0")
GGUF_FILE = "model.gguf"


def export(run_path: Path | str, format: str, out: Path | str, dtype: str | None = None) -> Path:
    """Write the run `run_path` as `format` into the new folder `out`; `dtype` defaults to f32
    for merged (the precision it was trained in) and f16 for gguf and ollama."""
    from tunelab.run import Run

    out = Path(out)
    if format not in FORMATS:
        raise UserError(f"unknown export format '{format}'; choose {', '.join(FORMATS)}")
    dtype = dtype or ("f32" if format == "merged" else "f16")
    if dtype not in DTYPES or (format == "merged" and dtype == "q8_0"):
        allowed = DTYPES[:2] if format == "merged" else DTYPES
        raise UserError(f"--dtype {dtype} is not available for {format}; choose {', '.join(allowed)}")
    if out.exists():
        raise UserError(f"{out}: already exists; remove it or choose another --out")
    run = Run(run_path)
    tokenizer_pre = modelfile = None
    if format in ("gguf", "ollama"):
        from transformers import AutoConfig

        weights = run.files.model if run.files.model.exists() else run.base_path()
        tokenizer_pre = check_gguf_supported(AutoConfig.from_pretrained(weights), run.tokenizer)
    if format == "ollama":
        modelfile = ollama_modelfile(run.template)
    model = run.model()

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if format == "merged":
            write_merged(model, run.tokenizer, run.template, staging, dtype)
        else:
            write_gguf(model, run.tokenizer, run.template, staging / GGUF_FILE, dtype, tokenizer_pre,
                       name=run.path.resolve().name)
        if modelfile is not None:
            (staging / "Modelfile").write_text(modelfile)
        (staging / "README.md").write_text(model_card(run, format, dtype, out))
        staging.chmod(0o755)  # mkdtemp's folder is private; an export is read by other programs and users
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def ollama_name(out: Path) -> str:
    """A model name Ollama accepts, from the export folder's name."""
    return re.sub(r"[^a-z0-9._-]+", "-", Path(out).resolve().name.lower()).strip("-._") or "tunelab-model"


# --- merged: a Hugging Face folder -------------------------------------------------------------


def write_merged(model, tokenizer, template: Template, folder: Path, dtype: str) -> None:
    import torch

    model = model.to(torch.float16 if dtype == "f16" else torch.float32)
    # Generation stops where tunelab's own stops: at the template's end-of-turn token as well as EOS.
    model.generation_config.eos_token_id = list(template.stop_token_ids)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    # The run's template becomes the tokenizer's, so apply_chat_template (and vLLM) render exactly
    # the prompts the model was trained on.
    tokenizer.chat_template = template.source
    tokenizer.save_pretrained(folder)


# --- gguf: one file for llama.cpp --------------------------------------------------------------

# llama.cpp names a byte-level BPE tokenizer's pre-tokenizer (how text is split before the merges);
# these are the splits tunelab recognises, by their Hugging Face `tokenizer.json` description.
_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if (kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT
            and not steps[1].get("use_regex", True)):
        return "llama-bpe"
    return None


def check_gguf_supported(config, tokenizer) -> str:
    """The llama.cpp pre-tokenizer name for `tokenizer`, or a UserError saying what GGUF export
    supports."""
    if config.model_type != "llama":
        raise UserError(f"GGUF export supports the Llama architecture (SmolLM2, Llama 2/3 and their kin); "
                        f"this model is '{config.model_type}': export it with --format merged instead")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"GGUF export supports plain RoPE; this model uses '{rope['rope_type']}' RoPE scaling: "
                        "export it with --format merged instead")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    name = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if spec["model"]["type"] != "BPE" or name is None:
        raise UserError("GGUF export supports byte-level BPE tokenizers split like GPT-2, SmolLM2 or Llama 3; "
                        "this tokenizer is not one of them: export it with --format merged instead")
    return name


def _permute(weight, heads: int):
    """Hugging Face orders the rows of each Q/K head as two halves that RoPE rotates together;
    llama.cpp rotates adjacent pairs: interleave the halves (as llama.cpp's converter does)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, tokenizer, template: Template, path: Path, dtype: str, tokenizer_pre: str, name: str) -> None:
    import gguf
    import numpy as np

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, token_types = _vocabulary(tokenizer, config.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_eot_token_id(template.stop_token_ids[0])
    writer.add_add_bos_token(_adds_bos(tokenizer))
    writer.add_add_eos_token(False)
    writer.add_chat_template(template.source)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd as the output layer when there is no output tensor
        data = tensor.detach().float()
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, config.num_attention_heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, config.num_key_value_heads)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for Llama tensor {hf_name}")
        data = data.numpy()
        # Norms (1-D) stay f32 as in llama.cpp's own files; rows that are not whole Q8_0 blocks
        # (32 values) fall back to f16, as llama.cpp's converter does.
        if data.ndim == 1 or dtype == "f32":
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif dtype == "q8_0" and data.shape[-1] % 32 == 0:
            quantised = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, quantised, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself puts BOS before a text (llama.cpp then does the same)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every token id's text (byte-level spelling for BPE tokens, plain text for added tokens)
    and its llama.cpp type; ids the tokenizer does not use are padded as UNUSED."""
    import gguf

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


# --- ollama: the GGUF and a Modelfile ----------------------------------------------------------


@dataclass
class TurnFormat:
    """How a template writes a conversation, when it writes each message as fixed text around its
    content (ChatML, Llama 3, Alpaca and most others); learned from renderings of marker messages."""

    head: str
    """Text before the first message: the BOS token, when the tokenizer adds one itself."""
    wrap: dict[str, tuple[str, str]]
    """Text before and after the content of a system, user and assistant message."""
    generation: str
    """Text after the last message that asks for the next assistant turn."""
    default_system: str | None
    """The system prompt the template writes when a conversation has none."""

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """What the Modelfile's TEMPLATE renders (Ollama sends SYSTEM as a first system message)."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        text = self.head
        for message in messages:
            before, after = self.wrap[message["role"]]
            text += before + message["content"] + after
        if add_generation_prompt and messages[-1]["role"] != "assistant":
            text += self.generation
        return text

    def go_template(self) -> str:
        """The same as a Go template over Ollama's `.Messages`. The head is left out: llama.cpp
        adds the BOS token itself when the GGUF says the tokenizer does."""
        def literal(text: str) -> str:
            return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""

        parts = ["{{ range $i, $m := .Messages }}"]
        for k, role in enumerate(("system", "user", "assistant")):
            before, after = self.wrap[role]
            parts.append(("{{ if" if k == 0 else "{{ else if") + f' eq $m.Role "{role}" }}}}'
                         + literal(before) + "{{ $m.Content }}" + literal(after))
        parts.append("{{ end }}")
        parts.append('{{ if and (eq (len (slice $.Messages $i)) 1) (ne $m.Role "assistant") }}'
                     + literal(self.generation) + "{{ end }}")
        parts.append("{{ end }}")
        return "".join(parts)


_MARKERS = {"system": "xSYSTEMx", "user": "xUSER1x", "assistant": "xASSISTANT1x"}
_SAMPLES = [
    ([{"role": "user", "content": "Hello"}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Say yes.\nThen stop."}], True),
    ([{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "a"},
      {"role": "assistant", "content": "{\"b\": 1}"}], False),
]


def turn_format(template: Template) -> TurnFormat:
    """Learn how `template` wraps each message from its renderings of marker conversations, and
    check the result on sample conversations; a UserError if it does not render that way."""
    refusal = UserError(f"template '{template.name}' cannot be written as an Ollama TEMPLATE (it does not wrap "
                        "each message in fixed text); export with --format gguf, whose metadata holds the template")
    s, u, a = ({"role": role, "content": marker} for role, marker in _MARKERS.items())
    u2, a2 = {"role": "user", "content": "xUSER2x"}, {"role": "assistant", "content": "xASSISTANT2x"}

    def pieces(text: str, *markers: str) -> list[str]:
        found = re.split("|".join(markers), text)
        if len(found) != len(markers) + 1 or any(text.count(m) != 1 for m in markers):
            raise refusal
        return found

    def after(text: str, prefix: str) -> str:
        if not text.startswith(prefix):
            raise refusal
        return text[len(prefix):]

    try:
        whole = pieces(template.render([s, u, a, u2, a2]), *(m["content"] for m in (s, u, a, u2, a2)))
        user_after = pieces(template.render([s, u]), s["content"], u["content"])[2]
        asked = pieces(template.render([s, u], add_generation_prompt=True), s["content"], u["content"])[2]
        no_system = pieces(template.render([u], add_generation_prompt=True), u["content"])[0]
    except UserError:  # e.g. a template that refuses system messages
        raise refusal from None
    assistant_after = whole[5]
    user_before = after(whole[3], assistant_after)
    assistant_before = after(whole[2], user_after)
    if not whole[1].endswith(user_before):
        raise refusal
    system_after = whole[1][: len(whole[1]) - len(user_before)]
    bos = template.tokenizer.bos_token
    head = bos if _adds_bos(template.tokenizer) and bos and whole[0].startswith(bos) else ""
    system_before = whole[0][len(head):]
    default_system = None
    if no_system != head + user_before:
        inner = after(no_system, head + system_before)
        if not inner.endswith(system_after + user_before):
            raise refusal
        default_system = inner[: len(inner) - len(system_after + user_before)]
    found = TurnFormat(head=head, generation=after(asked, user_after), default_system=default_system,
                       wrap={"system": (system_before, system_after), "user": (user_before, user_after),
                             "assistant": (assistant_before, assistant_after)})
    for messages, add_generation_prompt in _SAMPLES:
        if found.render(messages, add_generation_prompt) != template.render(messages, add_generation_prompt):
            raise refusal
    return found


def ollama_modelfile(template: Template) -> str:
    turns = turn_format(template)
    tokenizer = template.tokenizer
    stops = dict.fromkeys(tokenizer.convert_ids_to_tokens(template.stop_token_ids))
    lines = [
        "# Written by tunelab export: the run's prompt template, stop tokens and default system prompt.",
        f"FROM ./{GGUF_FILE}",
        f'TEMPLATE """{turns.go_template()}"""',
    ]
    if turns.default_system is not None:
        if '"""' in turns.default_system:
            raise UserError(f"template '{template.name}': its default system prompt holds '\"\"\"', "
                            "which a Modelfile cannot quote; export with --format gguf")
        lines.append(f'SYSTEM """{turns.default_system}"""')
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    lines.append("# Greedy decoding, as `tunelab generate` answers.")
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


# --- the model card ----------------------------------------------------------------------------


def model_card(run, format: str, dtype: str, out: Path) -> str:
    config, info = run.config, run.info
    method = (f"LoRA (rank {config.lora_rank}, alpha {config.lora_alpha}, {config.lora_targets}), merged into the base"
              if info["method"] == "lora" else "full fine-tuning")
    lines = [
        f"# {run.path.resolve().name}",
        "",
        f"Fine-tuned with tunelab from `{info['base']}` and exported as {format} ({dtype}).",
        "",
        "## Training",
        "",
        f"- base model: `{info['base']}`",
        f"- method: {method}",
        f"- schedule: {_schedule(config)}",
        f"- data: {_data_summary(run)}",
        *[f"- {line}" for line in _loss_summary(run)],
        "",
        "## Evaluation",
        "",
        *_evaluation(run),
        "",
        "## Prompt template",
        "",
        f"`{run.template.name}`; an answer ends with "
        + ", ".join(f"`{t}`" for t in dict.fromkeys(run.tokenizer.convert_ids_to_tokens(run.template.stop_token_ids)))
        + ". Its Jinja source (also the tokenizer's chat template):",
        "",
        "```jinja",
        run.template.source,
        "```",
        "",
        "## How to run it",
        "",
        *_how_to_run(format, out),
    ]
    return "\n".join(lines) + "\n"


def _schedule(config) -> str:
    length = f"{config.max_steps} steps" if config.max_steps else f"{config.epochs:g} epochs"
    return (f"{length} of {config.batch_size * config.grad_accum} examples, peak learning rate "
            f"{config.learning_rate:g}, up to {config.max_length} tokens")


def _data_summary(run) -> str:
    summary = f"{run.info['train_examples']} training and {run.info['test_examples']} held-out examples"
    report = run.path / "data_check.json"
    if not report.exists():
        return summary
    check = json.loads(report.read_text())
    duplicates = check["duplicates"]["exact"]["count"]
    return (f"{summary}, from `{Path(check['file']).name}` ({check['rows']} rows, {check['valid']} valid, "
            f"{duplicates} exact duplicates dropped; {check['lengths']['median']:g} {check['lengths']['unit']} "
            f"per example at the median)")


def _loss_summary(run) -> list[str]:
    rows = [json.loads(line) for line in run.files.metrics.read_text().splitlines()] if run.files.metrics.exists() else []
    train = [r["loss"] for r in rows if "loss" in r]
    held_out = [r["eval_loss"] for r in rows if "eval_loss" in r]
    lines = []
    if train:
        lines.append(f"final training loss: {train[-1]:.4f}")
    if held_out:
        lines.append(f"held-out loss: {held_out[0]:.4f} before training, {held_out[-1]:.4f} after")
    return lines


def _evaluation(run) -> list[str]:
    if not run.files.eval.exists():
        return [f"Not evaluated; `tunelab eval {run.path}` compares the base and tuned models on the held-out split."]
    from tunelab.evaluate.core import format_table

    results = json.loads(run.files.eval.read_text())
    return [f"`tunelab eval` on {results['examples_evaluated']} held-out examples, greedy decoding:",
            "", "```", format_table(results), "```"]


def _how_to_run(format: str, out: Path) -> list[str]:
    if format == "merged":
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{out}")',
            f'model = AutoModelForCausalLM.from_pretrained("{out}")',
            'ids = tokenizer.apply_chat_template([{"role": "user", "content": "..."}], add_generation_prompt=True,',
            '                                    return_tensors="pt", return_dict=True)',
            "answer = model.generate(**ids, max_new_tokens=256)",
            'print(tokenizer.decode(answer[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))',
            "```",
            "",
            f"or serve it: `vllm serve {out}`.",
        ]
    gguf = out / GGUF_FILE
    lines = [
        "With llama.cpp (the chat template is in the GGUF):",
        "",
        f"    llama-cli -m {gguf} --jinja -cnv",
        f"    llama-server -m {gguf} --jinja",
    ]
    if format == "ollama":
        lines += ["", "With Ollama:", "", f"    ollama create {ollama_name(out)} -f {out / 'Modelfile'}",
                  f"    ollama run {ollama_name(out)}"]
    return lines
