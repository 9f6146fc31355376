"""Few-shot and retrieval prompts: the examples as earlier turns, rendered by the run's Template."""

from tunelab.data.load import Example
from tunelab.evaluate.baselines import BM25, few_shot_prompts, retrieval_prompts
from tunelab.template import Template


def example(question: str, answer: str, line: int, system: str | None = None) -> Example:
    messages = [{"role": "system", "content": system}] if system else []
    return Example(messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], line)


TRAIN = [
    example("What is the capital of France?", "Paris", 1),
    example("Book a table for two on Friday evening", "{}", 2),
    example("Which river flows through Paris, France?", "The Seine", 3),
    example("How many legs does a spider have?", "Eight", 4),
    example("Translate 'good morning' into French", "Bonjour", 5),
]


def test_retrieval_picks_the_most_similar_examples_closest_last():
    index = BM25(TRAIN)
    question = [{"role": "user", "content": "What river runs through Paris?"}]
    picked = index.most_similar(question, 2)
    assert [e.line for e in picked] == [1, 3]  # the river question is the closest, so it comes last
    assert [e.line for e in index.most_similar([{"role": "user", "content": "spider legs"}], 1)] == [4]


def test_retrieval_skips_the_question_itself():
    question = [{"role": "user", "content": "How many legs does a spider have?"}]
    assert 4 not in [e.line for e in BM25(TRAIN).most_similar(question, 3)]


def test_few_shot_prompt_is_rendered_through_the_template(tokenizer):
    template = Template.for_model(tokenizer, "chatml")
    question = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of Spain?"}]
    prompts = few_shot_prompts([question], TRAIN, k=2, seed=0)
    messages = prompts[0]
    assert messages[0] == question[0] and messages[-1] == question[-1]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    again = few_shot_prompts([[{"role": "user", "content": "Other question"}]], TRAIN, k=2, seed=0)[0]
    assert again[:-1] == messages[1:-1]  # the same shots for every question
    text = template.render(messages, add_generation_prompt=True)
    shot_question, shot_answer = messages[1]["content"], messages[2]["content"]
    assert (f"<|im_start|>user\n{shot_question}<|im_end|>\n<|im_start|>assistant\n{shot_answer}<|im_end|>"
            in text)
    assert text.endswith("<|im_start|>user\nCapital of Spain?<|im_end|>\n<|im_start|>assistant\n")
    assert template.encode_prompt(messages) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_retrieval_prompts_put_retrieved_examples_before_each_question():
    questions = [[{"role": "user", "content": "Which river is in Paris?"}],
                 [{"role": "user", "content": "Spider: how many legs?"}]]
    prompts = retrieval_prompts(questions, TRAIN, k=1)
    assert prompts[0] == TRAIN[2].messages + questions[0]
    assert prompts[1] == TRAIN[3].messages + questions[1]
