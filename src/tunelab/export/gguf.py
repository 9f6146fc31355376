"""`tunelab export RUN --format gguf`: one file for llama.cpp (and Ollama) holding the weights, the
tokenizer, and the run's chat template and end-of-turn token in its metadata.

Written with the `gguf` package, llama.cpp's own Python writer. What this export supports (the Llama
architecture with plain RoPE, byte-level BPE tokenizers split like GPT-2, SmolLM2 or Llama 3) is
checked first by `check_gguf_supported`, so an export refuses in one line before it writes anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.errors import UserError
from tunelab.template import Template, adds_bos

GGUF_FILE = "model.gguf"


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
    halves = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


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
    writer.add_add_bos_token(adds_bos(tokenizer))
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
        data = data.cpu().numpy()  # a model evaluated on a GPU is exported from there
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
