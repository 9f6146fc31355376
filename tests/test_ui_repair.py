"""`tunelab ui` beyond the first loop, at the HTTP level: rating and repairing a run's held-out
answers (RUN/corrections.jsonl and RUN/fixes.jsonl in the shared shapes) and training again
with them, the arena's columns, export jobs, and rows fixed in the page saved as a new file.
Every new POST is tried without the token, from another origin and with paths out of the folders."""

from __future__ import annotations

import html
import json
import shutil

import pytest

pytest.importorskip("starlette")

from starlette.testclient import TestClient  # noqa: E402

from uiclient import ESCAPED, SCRIPT, refused_across_sites, wait_for  # noqa: E402


@pytest.fixture
def evaluated(folders, tiny_run):
    """A copy of the tiny run with an eval.json written as `tunelab eval` writes it: the first
    held-out answer wrong (and holding markup), the second right."""
    from tunelab.data.load import read_jsonl
    from tunelab.evaluate.baselines import user_text
    from tunelab.evaluate.results import Answer, Contender, EvalResults, Sample

    run = folders / "runs" / "cities"
    shutil.copytree(tiny_run, run)
    examples = read_jsonl(run / "test.jsonl")
    answers = [f"Atlantis {SCRIPT}", examples[1].reference]
    samples = [Sample(index=i, line=e.line, prompt=user_text(e.prompt_messages()), reference=e.reference,
                      answers={"tuned": Answer(text=answer, exact_match=float(answer == e.reference),
                                               bucket="correct" if answer == e.reference else "wrong")})
               for i, (e, answer) in enumerate(zip(examples, answers))]
    EvalResults(examples_evaluated=2, contenders=[Contender(name="tuned", kind="local")],
                samples=samples).write(run / "eval.json")
    return run, examples


# ---------------------------------------------------------------------- rate and repair


def test_wrong_answers_come_first_and_show_as_text(ui, evaluated):
    client, _ = ui
    run, examples = evaluated
    page = client.get("/runs/cities/answers")
    assert page.status_code == 200
    assert SCRIPT not in page.text and f"Atlantis {ESCAPED}" in page.text
    wrong, right = (page.text.index(f'data-line="{e.line}"') for e in examples)
    assert wrong < right and "2 held-out rows: 1 wrong" in page.text
    assert "Rate and repair its answers" in client.get("/runs/cities").text


def test_a_repaired_answer_is_a_row_of_corrections_jsonl(ui, evaluated):
    client, _ = ui
    run, examples = evaluated
    first = examples[0]
    answer = client.post("/api/runs/cities/corrections", json={"line": first.line, "text": "  France\n"})
    assert answer.status_code == 200, answer.text
    rows = [json.loads(line) for line in (run / "corrections.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": first.prompt_messages(), "chosen": [{"role": "assistant", "content": "France"}],
                     "rejected": [{"role": "assistant", "content": f"Atlantis {SCRIPT}"}], "line": first.line}]
    assert rows[0]["prompt"][-1]["role"] == "user"
    # Repaired again: the row is replaced, not added.
    assert client.post("/api/runs/cities/corrections", json={"line": first.line, "text": "Spain"}).json()["count"] == 1
    rows = [json.loads(line) for line in (run / "corrections.jsonl").read_text().splitlines()]
    assert [row["chosen"][0]["content"] for row in rows] == ["Spain"]
    page = client.get("/runs/cities/answers").text
    assert "1 correction saved" in page and "Train again with the corrections" in page
    for bad, why in (({"line": 999, "text": "x"}, "line 999: not a held-out row"),
                     ({"line": first.line, "text": "  "}, "the correct answer is empty"),
                     ({"text": "x"}, "line: field required")):
        refused = client.post("/api/runs/cities/corrections", json=bad)
        assert refused.status_code == 400 and why in refused.json()["error"], refused.text
    assert refused_across_sites(client, "/api/runs/cities/corrections", {"line": first.line, "text": "Evil"})
    assert client.post("/api/runs/..%2F..%2Fx/corrections", json={"line": 1, "text": "x"}).status_code in (400, 404)
    assert [json.loads(line)["chosen"][0]["content"] for line in (run / "corrections.jsonl").open()] == ["Spain"]


def test_a_wrong_reference_is_a_row_of_fixes_jsonl_and_the_data_stays(ui, evaluated):
    client, _ = ui
    run, examples = evaluated
    test_file = (run / "test.jsonl").read_text()
    second = examples[1]
    answer = client.post("/api/runs/cities/fixes", json={"line": second.line, "text": SCRIPT})
    assert answer.status_code == 200, answer.text
    rows = [json.loads(line) for line in (run / "fixes.jsonl").read_text().splitlines()]
    assert rows == [{"line": second.line, "messages": second.prompt_messages() + [
        {"role": "assistant", "content": SCRIPT}], "was": second.reference}]
    assert (run / "test.jsonl").read_text() == test_file
    page = client.get("/runs/cities/answers").text
    assert "Reference fixed to" in page and SCRIPT not in page
    assert refused_across_sites(client, "/api/runs/cities/fixes", {"line": second.line, "text": "x"})


def test_a_run_not_evaluated_has_no_answers_yet(ui, folders, tiny_run):
    client, _ = ui
    shutil.copytree(tiny_run, folders / "runs" / "fresh")
    page = client.get("/runs/fresh/answers")
    assert page.status_code == 200 and "No held-out answers to rate yet" in page.text
    refused = client.post("/api/runs/fresh/corrections", json={"line": 1, "text": "x"})
    assert refused.status_code == 400 and "no eval.json yet" in refused.json()["error"]


def test_the_train_page_adds_a_runs_corrections_to_the_next_run(ui, folders, evaluated):
    """The command gets `--data-extra RUN/corrections.jsonl`; that training reads it is the
    train command's own test."""
    client, state = ui
    run, examples = evaluated
    (folders / "data" / "pairs.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    assert "--data-extra" not in client.get("/train").text  # nothing to add yet
    client.post("/api/runs/cities/corrections", json={"line": examples[0].line, "text": "France"})
    page = client.get("/train?data=pairs.jsonl&extra=cities").text
    assert 'data-file="' + f'{folders}/runs/cities/corrections.jsonl"' in page and "cities: 1 correction" in page
    assert f'<option value="cities" data-file="{folders}/runs/cities/corrections.jsonl" selected>' in page
    answer = client.post("/api/train", json={"data": "pairs.jsonl", "name": "again", "max_steps": "3",
                                              "data_extra": "cities"})
    assert answer.status_code == 200, answer.text
    runs, data = folders / "runs", folders / "data"
    assert answer.json()["command"] == (f"tunelab train {data}/pairs.jsonl --out {runs}/again --max-steps 3 "
                                        f"--data-extra {runs}/cities/corrections.jsonl")
    assert state.store.get(answer.json()["job"]).argv[-2:] == ["--data-extra", f"{runs}/cities/corrections.jsonl"]
    state.store.cancel(answer.json()["job"])
    for extra in ("nothere", "../cities", "fresh"):
        refused = client.post("/api/train", json={"data": "pairs.jsonl", "name": f"x{len(extra)}",
                                                   "data_extra": extra})
        assert refused.status_code == 400, extra


# ---------------------------------------------------------------------- the arena


def test_the_arena_answers_as_eval_and_generate_do(ui, folders, tiny_run):
    from tunelab.data.load import read_jsonl
    from tunelab.decoding.generate import generate_batch
    from tunelab.evaluate.baselines import few_shot_prompts
    from tunelab.run import Run

    client, _ = ui
    shutil.copytree(tiny_run, folders / "runs" / "cities")
    page = client.get("/arena")
    assert page.status_code == 200 and 'value="cities" checked' in page.text
    prompt = "Country of Paris? (0)"
    asked = {column: client.post("/api/arena", json={"run": "cities", "column": column, "prompt": prompt,
                                                     "max_new_tokens": 6})
             for column in ("zero-shot", "few-shot", "tuned")}
    assert all(answer.status_code == 200 for answer in asked.values()), {k: v.text for k, v in asked.items()}
    run = Run(folders / "runs" / "cities")
    messages = [{"role": "user", "content": prompt}]
    assert asked["tuned"].json() == {"answer": run.generate(messages, max_new_tokens=6), "shots": 0}
    base = run.base_model()
    few = few_shot_prompts([messages], read_jsonl(run.files.train), 3)[0]
    expected = generate_batch(base, run.template, [messages, few], 6, precision=run.precision)
    assert asked["zero-shot"].json() == {"answer": expected[0], "shots": 0}
    assert asked["few-shot"].json() == {"answer": expected[1], "shots": 3}
    for bad in ({"run": "cities", "column": "oracle", "prompt": "x"}, {"run": "cities", "column": "tuned"},
                {"run": "../cities", "column": "tuned", "prompt": "x"},
                {"run": "nothere", "column": "tuned", "prompt": "x"}):
        assert client.post("/api/arena", json=bad).status_code == 400, bad
    assert refused_across_sites(client, "/api/arena", {"run": "cities", "column": "tuned", "prompt": prompt})


# ---------------------------------------------------------------------- export


def test_export_buttons_queue_the_export_command(ui, folders, tiny_run):
    client, state = ui
    shutil.copytree(tiny_run, folders / "runs" / "cities")
    (folders / "runs" / "untrained").mkdir()
    (folders / "runs" / "untrained" / "config.yaml").write_text("max_steps: 2\n")
    page = client.get("/runs/cities").text
    assert 'data-post="/api/runs/cities/export"' in page and "GGUF q8_0" in page and "Ollama" in page
    runs = folders / "runs"
    assert refused_across_sites(client, "/api/runs/cities/export", {"format": "gguf"})
    answers = [client.post("/api/runs/cities/export", json={"format": name}).json() for name in ("gguf-q8_0", "ollama")]
    assert [a["command"] for a in answers] == [
        f"tunelab export {runs}/cities --format gguf --out {runs}/cities/exports/gguf-q8_0 --dtype q8_0",
        f"tunelab export {runs}/cities --format ollama --out {runs}/cities/exports/ollama"]
    assert all(state.store.get(a["job"]).heavy for a in answers)  # exports wait in the queue with training
    for answer in answers:
        state.store.cancel(answer["job"])
    (runs / "cities" / "exports" / "ollama").mkdir(parents=True)  # taken: the next gets a free name
    again = client.post("/api/runs/cities/export", json={"format": "ollama"}).json()
    assert again["command"].endswith(f"--out {runs}/cities/exports/ollama-2")
    state.store.cancel(again["job"])
    for name, body, why in (("cities", {"format": "zip"}, "choose one of"),
                            ("untrained", {"format": "gguf"}, "once training has finished"),
                            ("..%2Fcities", {"format": "gguf"}, "no run")):
        refused = client.post(f"/api/runs/{name}/export", json=body)
        assert refused.status_code in (400, 404) and (refused.status_code == 404 or why in refused.json()["error"])
    assert "exports" in client.get("/runs/cities").text


@pytest.mark.slow
def test_an_ollama_export_runs_as_a_job_and_shows_its_import_command(ui, folders, tiny_run):
    client, state = ui
    shutil.copytree(tiny_run, folders / "runs" / "cities")
    answer = client.post("/api/runs/cities/export", json={"format": "ollama"}).json()
    wait_for(client, f"/jobs/{answer['job']}", "state-done", timeout=300)
    page = client.get("/runs/cities").text
    job = state.store.get(answer["job"])
    assert job.state == "done", state.store.log(job.id)
    out = folders / "runs" / "cities" / "exports" / "ollama"
    assert (out / "Modelfile").is_file() and (out / "model.gguf").is_file()
    assert f"ollama create ollama -f {out}/Modelfile" in page and 'data-copy="ollama create' in page
    card = client.get("/files/runs/cities/exports/ollama/README.md")
    assert card.status_code == 200 and card.headers["content-security-policy"].startswith("sandbox")


# ---------------------------------------------------------------------- fixing rows


def check(client: TestClient, name: str) -> tuple[str, str]:
    answer = client.post("/api/check", json={"file": name}).json()
    return answer["job"], wait_for(client, answer["url"], "Length of each example")


def test_rows_fixed_in_the_page_are_saved_as_a_new_file_and_checked(ui, folders):
    client, state = ui
    rows = [json.dumps({"prompt": f"Country of city {i}?", "completion": f"Land {i}",
                        "metadata": {"customer": f"c{i % 4}"}}) for i in range(12)]
    rows[3] = '{"prompt": "' + SCRIPT + '", "completion": '  # line 4: not JSON
    rows[5] = json.dumps({"prompt": "x" * 600, "completion": "", "metadata": {"customer": "c1"}})  # line 6: no answer,
    # and longer than the page shows a row
    rows.append(rows[0])  # line 13: an exact duplicate of line 1
    original = "\n".join(rows) + "\n"
    (folders / "data" / "rows.jsonl").write_text(original)
    job, page = check(client, "rows.jsonl")
    assert "E_JSON" in page and SCRIPT not in page and ESCAPED in page
    assert 'class="edit-row" data-line="4"' in page and "Save as rows.fixed.jsonl" in page
    long_row = html.escape(rows[5], quote=True).replace("&quot;", "&#34;")
    assert f'aria-label="line 6, edited">{long_row}</textarea>' in page  # whole, not cut as shown
    assert "Duplicates side by side" in page and 'value="13"' in page
    assert "--split-by metadata.customer" in page  # 4 customers over 12 rows
    assert refused_across_sites(client, "/api/data/fix", {"check": job, "drop": [4]})
    fixed_row = json.dumps({"prompt": "Country of city 3?", "completion": "Land 3"})
    answer = client.post("/api/data/fix", json={"check": job, "edits": {"4": fixed_row}, "drop": [6, 13]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["name"] == "rows.fixed.jsonl" and answer.json()["edited"] == 1
    assert (folders / "data" / "rows.jsonl").read_text() == original  # never changed
    written = (folders / "data" / "rows.fixed.jsonl").read_text().splitlines()
    assert written == rows[:3] + [fixed_row, rows[4]] + rows[6:12]
    page = wait_for(client, answer.json()["url"], "Length of each example")
    assert "Data check of rows.fixed.jsonl" in page and 'class="good">0</dd>' in page
    again = client.post("/api/data/fix", json={"check": job, "drop": [13]})
    assert again.status_code == 400 and "never overwrites" in again.json()["error"]
    for bad in ({"check": "../../x", "drop": [1]}, {"check": job, "drop": [99]}, {"check": job},
                {"check": job, "drop": list(range(1, 14))}):
        assert client.post("/api/data/fix", json=bad).status_code == 400, bad
    assert len([j for j in state.store.all() if j.kind == "check"]) == 2


def test_a_csv_file_is_not_fixed_in_the_page(ui, folders):
    client, _ = ui
    (folders / "data" / "rows.csv").write_text("prompt,completion\na,b\nc,\n")
    job, page = check(client, "rows.csv")
    assert "edit-row" not in page and "Save as" not in page
    refused = client.post("/api/data/fix", json={"check": job, "drop": [2]})
    assert refused.status_code == 400 and "only JSON lines files" in refused.json()["error"]


# ---------------------------------------------------------------------- teacher and review


def test_a_teacher_job_needs_consent_for_an_address_outside(ui, folders):
    client, state = ui
    (folders / "data" / "inputs.jsonl").write_text('{"prompt": "a"}\n')
    form = {"mode": "label", "inputs": "inputs.jsonl", "teacher": "http://93.184.216.34/v1", "model": "big",
            "out": "labelled.jsonl"}
    refused = client.post("/api/teacher", json=form)
    assert refused.status_code == 400 and "Pass --allow-remote" in refused.json()["error"]
    assert state.store.all() == []
    assert refused_across_sites(client, "/api/teacher", {**form, "allow_remote": True})
    answer = client.post("/api/teacher", json={**form, "allow_remote": True})
    assert answer.status_code == 200, answer.text
    data = folders / "data"
    assert answer.json()["command"] == (f"tunelab data label {data}/inputs.jsonl --teacher http://93.184.216.34/v1 "
                                        f"--model big --out {data}/labelled.jsonl --allow-remote")
    state.store.cancel(answer.json()["job"])
    local = client.post("/api/teacher", json={**form, "teacher": "http://127.0.0.1:9/v1", "mode": "synth",
                                              "inputs": "", "examples": "inputs.jsonl", "n": "5"})
    assert local.json()["command"] == (f"tunelab data synth --teacher http://127.0.0.1:9/v1 --model big --out "
                                       f"{data}/labelled.jsonl --examples {data}/inputs.jsonl --n 5")
    state.store.cancel(local.json()["job"])
    for bad, why in (({"out": "../x.jsonl"}, "name the new file"), ({"out": "inputs.jsonl"}, "exists already"),
                     ({"inputs": "../../etc/passwd"}, "outside"), ({"mode": "synth", "examples": ""}, "--examples"),
                     ({"mode": "synth", "examples": "inputs.jsonl", "n": "many"}, "--n")):
        refused = client.post("/api/teacher", json={**form, "teacher": "http://127.0.0.1:9/v1", **bad})
        assert refused.status_code == 400 and why in refused.json()["error"], (bad, refused.text)
    assert "Send my data outside this machine" in client.get("/teacher").text


def test_pairs_are_reviewed_in_the_page_with_the_decisions_file_of_data_review(ui, folders):
    from tunelab.data.load import load_examples
    from tunelab.data.review import decisions_path, load_decisions

    client, state = ui
    rows = [{"prompt": f"Q{i} {SCRIPT}", "completion": f"A{i}"} for i in range(3)]
    (folders / "data" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = [e.key for e in load_examples(folders / "data" / "pairs.jsonl")]
    page = client.get("/review?file=pairs.jsonl").text
    assert "3 to decide" in page and SCRIPT not in page and ESCAPED in page
    assert f"tunelab data review {folders}/data/pairs.jsonl --out {folders}/data/pairs.reviewed.jsonl" in page
    assert refused_across_sites(client, "/api/review", {"file": "pairs.jsonl", "key": keys[0], "decision": "accepted"})
    for key, decision, answer in zip(keys, ("accepted", "edited", "rejected"), ("", "B1", "")):
        saved = client.post("/api/review", json={"file": "pairs.jsonl", "key": key, "decision": decision,
                                                 "answer": answer})
        assert saved.status_code == 200, saved.text
        if decision == "accepted":
            early = client.post("/api/review/write", json={"file": "pairs.jsonl"})
            assert early.status_code == 400 and "2 pairs have no decision" in early.json()["error"]
    decisions = load_decisions(decisions_path(folders / "data" / "pairs.reviewed.jsonl"))
    assert {k: d["decision"] for k, d in decisions.items()} == dict(zip(keys, ("accepted", "edited", "rejected")))
    for bad in ({"file": "pairs.jsonl", "key": "0" * 64, "decision": "accepted"},
                {"file": "pairs.jsonl", "key": keys[0], "decision": "edited", "answer": " "},
                {"file": "../pairs.jsonl", "key": keys[0], "decision": "accepted"},
                {"file": "pairs.jsonl", "key": keys[0], "decision": "maybe"}):
        assert client.post("/api/review", json=bad).status_code == 400, bad
    written = client.post("/api/review/write", json={"file": "pairs.jsonl"}).json()
    assert "0 to decide" in client.get("/review?file=pairs.jsonl").text
    assert "pairs.reviewed.decisions.jsonl" not in client.get("/data").text  # bookkeeping, not a data file
    wait_for(client, written["url"], "state-done")
    assert state.store.get(written["job"]).state == "done", state.store.log(written["job"])
    out = [json.loads(line) for line in (folders / "data" / "pairs.reviewed.jsonl").read_text().splitlines()]
    assert [row["messages"][-1]["content"] for row in out] == ["A0", "B1"]
