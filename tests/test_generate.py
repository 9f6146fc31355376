"""The batched generation loop gives the answers of one-by-one `model.generate` calls."""

import torch

from tunelab.generate import generate_detailed
from tunelab.models import load_model
from tunelab.template import Template


def one_by_one(model, template, conversation, max_new_tokens):
    ids = torch.tensor([template.encode_prompt(conversation)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=template.stop_token_ids,
                         pad_token_id=template.tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_batched_answers_equal_one_by_one_generation(tiny_model_dir, tokenizer):
    model = load_model(tiny_model_dir).eval()
    with torch.no_grad():  # larger weights than the initialisation's, so answers vary from token to token
        generator = torch.Generator().manual_seed(0)
        for parameter in model.parameters():
            parameter.normal_(0, 0.5, generator=generator)
    template = Template.for_model(tokenizer, "chatml")
    shots = [{"role": "user", "content": "Country of Rome?"}, {"role": "assistant", "content": "Italy"}]
    conversations = [shots + [{"role": "user", "content": f"Country of {city}?" + " please" * i}]
                     for i, city in enumerate(["Paris", "Berlin", "Oslo", "Madrid", "Lisbon", "Vienna", "Bern"])]
    # Make a token that some answers produce early an end-of-turn token, so rows finish at
    # different steps and leave the batch while others go on.
    free = [one_by_one(model, template, c, 12) for c in conversations]
    template.stop_token_ids = [free[0][3], *template.stop_token_ids]
    expected = [one_by_one(model, template, c, 12) for c in conversations]
    stops = set(template.stop_token_ids)
    assert len({len(e) for e in expected}) > 1  # rows of different lengths

    answers = list(generate_detailed(model, template, conversations, max_new_tokens=12, batch_size=3))
    for answer, tokens, conversation in zip(answers, expected, conversations):
        assert answer.text == tokenizer.decode([t for t in tokens if t not in stops], skip_special_tokens=True).strip()
        assert answer.generated_tokens == len(tokens)
        assert answer.stopped == (tokens[-1] in stops)
        assert answer.prompt_tokens == len(template.encode_prompt(conversation))
