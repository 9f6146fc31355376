// tunelab ui: the buttons, the upload, the training form's command, live curves, chat, the arena,
// repairing answers and fixing rows.
// User data only ever reaches the page through textContent and SVG attributes, never as HTML.
"use strict";

const token = document.querySelector('meta[name="tunelab-token"]').content;

function showMessage(text) {
  const box = document.getElementById("message");
  box.textContent = text;
  box.hidden = !text;
  if (text) box.scrollIntoView({block: "nearest"});
}

// POST with the session token (guard.py refuses any POST without it); resolves to the JSON
// answer or shows the error line and rejects.
async function post(url, body, contentType = "application/json") {
  let response;
  try {
    response = await fetch(url, {
      method: "POST", body: contentType === "application/json" ? JSON.stringify(body || {}) : body,
      headers: {"X-Tunelab-Token": token, "Content-Type": contentType},
    });
  } catch (e) {
    showMessage("tunelab ui is not answering: is it still running?");
    throw e;
  }
  const text = await response.text();
  let answer;
  try { answer = JSON.parse(text); } catch (e) { answer = {error: text}; }
  if (!response.ok) {
    showMessage(answer.error || `error ${response.status}`);
    throw new Error(answer.error);
  }
  return answer;
}

// Buttons that do one thing: data-post="URL" [data-body='JSON'] [data-then="reload"].
document.addEventListener("click", async (e) => {
  const button = e.target.closest("button[data-post]");
  if (!button) return;
  button.disabled = true;
  try {
    const answer = await post(button.dataset.post, JSON.parse(button.dataset.body || "{}"));
    if (button.dataset.then === "reload" || !answer.url) location.reload();
    else location.href = answer.url;
  } catch (err) {
    button.disabled = false;
  }
});

// Data page: upload the chosen file, then check it.
const upload = document.getElementById("upload");
if (upload) {
  upload.addEventListener("change", async () => {
    const file = upload.files[0];
    if (!file) return;
    showMessage(`Uploading ${file.name} …`);
    try {
      const saved = await post("/api/data?name=" + encodeURIComponent(file.name), file, "application/octet-stream");
      const check = await post("/api/check", {file: saved.name});
      location.href = check.url;
    } catch (err) {
      upload.value = "";
    }
  });
}

function shellQuote(text) {
  return /^[\w@%+=:,./-]+$/.test(text) ? text : "'" + text.replace(/'/g, "'\"'\"'") + "'";
}

// Train page: the command line the form equals, as the server will build it.
const trainForm = document.getElementById("train-form");
if (trainForm) {
  const command = document.getElementById("train-command");
  const curveCommand = document.getElementById("curve-command");
  const sweepCommand = document.getElementById("sweep-command");
  // The training flags, as the server's training_flags builds them (lr replaced in a sweep).
  const flags = (lr) => {
    const words = [];
    for (const input of trainForm.querySelectorAll("[data-flag]")) {
      const value = input.name === "lr" && lr !== null ? lr : input.value.trim();
      if (value !== "" && value !== input.dataset.default && Number(value) !== Number(input.dataset.default || NaN)) {
        words.push(input.dataset.flag, value);
      }
    }
    const extra = document.getElementById("data-extra");
    if (extra && extra.value) words.push("--data-extra", extra.selectedOptions[0].dataset.file);
    return words;
  };
  const update = () => {
    const form = new FormData(trainForm);
    const data = trainForm.dataset.data + "/" + form.get("data");
    const sweep = form.get("sweep_lr").split(",").map((v) => v.trim()).filter((v) => v);
    const lines = (sweep.length ? sweep : [null]).map((lr) => {
      const name = lr === null ? form.get("name") : `${form.get("name")}-lr-${lr}`;
      const words = ["tunelab", "train", data, "--out", trainForm.dataset.runs + "/" + name, ...flags(lr)];
      return words.map(shellQuote).join(" ");
    });
    command.textContent = lines.join("\n");
    const sizes = form.get("sizes").split(",").map((v) => v.trim()).filter((v) => v).join(",");
    curveCommand.textContent = ["tunelab", "curve", data, "--sizes", sizes,
                                "--out", `${trainForm.dataset.runs}/${form.get("name")}-curve`, ...flags(null)]
      .map(shellQuote).join(" ");
    const grid = form.get("grid").split("\n").map((line) => line.replace(/\s+/g, "")).filter((line) => line)
      .flatMap((line) => ["--grid", line]);
    sweepCommand.textContent = ["tunelab", "sweep", data, ...grid,
                                "--out", `${trainForm.dataset.runs}/${form.get("name")}-sweep`, ...flags(null)]
      .map(shellQuote).join(" ");
  };
  trainForm.addEventListener("input", update);
  update();
  const start = async (url) => {
    const body = Object.fromEntries(new FormData(trainForm).entries());
    const answer = await post(url, body).catch(() => null);
    if (answer) location.href = answer.url;
  };
  trainForm.addEventListener("submit", (e) => {
    e.preventDefault();
    start("/api/train");  // the sizes and grid go along; they are the curve's and sweep's, training ignores them
  });
  document.getElementById("start-curve").addEventListener("click", () => start("/api/curve"));
  document.getElementById("sizes").addEventListener("keydown", (e) => {
    if (e.key !== "Enter") return;
    e.preventDefault();  // Enter in the sizes starts the learning curve, not a training run
    start("/api/curve");
  });
  document.getElementById("start-sweep").addEventListener("click", () => start("/api/sweep"));
}

// Runs page: compare the ticked runs.
const compareForm = document.getElementById("compare-form");
if (compareForm) {
  compareForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const runs = [...compareForm.querySelectorAll("input[name=run]:checked")].map((box) => box.value);
    const answer = await post("/api/compare", {runs}).catch(() => null);
    if (answer) location.href = answer.url;
  });
}

// Run page: metrics.jsonl over server-sent events, drawn as two curves.
const SVG = "http://www.w3.org/2000/svg";

function svgElement(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

function drawCurve(svg, rows) {
  svg.replaceChildren();
  const train = rows.filter((r) => r.loss !== undefined);
  const held = rows.filter((r) => r.eval_loss !== undefined);
  const all = [...train.map((r) => r.loss), ...held.map((r) => r.eval_loss)];
  if (!all.length) {
    svg.append(svgElement("text", {x: 300, y: 130, "text-anchor": "middle"}, "waiting for the first step …"));
    return;
  }
  const [w, h, left, bottom] = [600, 260, 48, 24];
  const maxStep = Math.max(1, ...rows.map((r) => r.step || 0));
  const low = Math.min(...all), high = Math.max(...all);
  const span = high - low || 1;
  const x = (step) => left + (step / maxStep) * (w - left - 8);
  const y = (loss) => 8 + (1 - (loss - low) / span) * (h - bottom - 16);
  svg.append(svgElement("line", {x1: left, y1: h - bottom, x2: w, y2: h - bottom, class: "axis"}));
  svg.append(svgElement("line", {x1: left, y1: 0, x2: left, y2: h - bottom, class: "axis"}));
  svg.append(svgElement("text", {x: left - 4, y: 14, "text-anchor": "end"}, high.toFixed(2)));
  svg.append(svgElement("text", {x: left - 4, y: h - bottom, "text-anchor": "end"}, low.toFixed(2)));
  svg.append(svgElement("text", {x: w, y: h - 4, "text-anchor": "end"}, `step ${maxStep}`));
  for (const [points, key, name] of [[train, "loss", "train-line"], [held, "eval_loss", "eval-line"]]) {
    if (!points.length) continue;
    svg.append(svgElement("polyline", {class: name, points: points.map((r) => `${x(r.step)},${y(r[key])}`).join(" ")}));
    for (const r of points) svg.append(svgElement("circle", {class: name, cx: x(r.step), cy: y(r[key]), r: 2.5}));
  }
}

function formatSeconds(s) {
  if (!isFinite(s)) return "–";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

const runCard = document.getElementById("run");
if (runCard) {
  const svg = document.getElementById("curve");
  let rows = [], totalSteps = null;
  const set = (id, text) => { document.getElementById(id).textContent = text; };
  const refresh = () => {
    drawCurve(svg, rows);
    const train = rows.filter((r) => r.loss !== undefined);
    const held = rows.filter((r) => r.eval_loss !== undefined);
    const last = train[train.length - 1];
    if (held.length) set("eval-loss", held[held.length - 1].eval_loss);
    if (!last) return;
    set("step", totalSteps ? `${last.step} of ${totalSteps}` : last.step);
    set("loss", last.loss);
    set("speed", last.tokens_per_s);
    if (totalSteps && last.step && runCard.dataset.status === "training") {
      set("eta", formatSeconds((last.elapsed_s / last.step) * (totalSteps - last.step)));
    }
  };
  const events = new EventSource(runCard.dataset.events);
  events.addEventListener("metrics", (e) => { rows = rows.concat(JSON.parse(e.data)); refresh(); });
  events.addEventListener("reset", () => { rows = []; refresh(); });
  events.addEventListener("state", (e) => {
    const state = JSON.parse(e.data);
    totalSteps = state.total_steps;
    // A new status brings other buttons: the page is drawn again from the files.
    if (state.status !== runCard.dataset.status) { events.close(); location.reload(); return; }
    refresh();
  });
  events.addEventListener("end", () => events.close());
  events.addEventListener("error", (e) => {
    if (e.data) { showMessage(JSON.parse(e.data).error); events.close(); }
  });
  refresh();
}

// Job and check pages: the log as it grows; the page is drawn again when the job ends.
const jobCard = document.querySelector("[data-job-events]");
if (jobCard) {
  const log = document.getElementById("log");
  const events = new EventSource(jobCard.dataset.jobEvents);
  const initial = jobCard.dataset.state;
  events.addEventListener("log", (e) => {
    if (!log) return;
    log.textContent += JSON.parse(e.data);
    log.scrollTop = log.scrollHeight;
  });
  events.addEventListener("state", (e) => {
    const state = JSON.parse(e.data).state;
    if (initial !== undefined && state !== initial) { events.close(); location.reload(); }
  });
  events.addEventListener("end", () => {
    events.close();
    if (initial === undefined) location.reload();
  });
  events.addEventListener("error", (e) => {
    if (e.data) { showMessage(JSON.parse(e.data).error); events.close(); }
  });
}

// Chat page: the conversation lives in the page; each turn is one POST of all of it.
const chatForm = document.getElementById("chat-form");
if (chatForm) {
  const list = document.getElementById("conversation");
  const text = document.getElementById("chat-text");
  const picker = document.getElementById("chat-run");
  let messages = [];
  const showCommand = () => {
    document.getElementById("chat-command").textContent = picker.selectedOptions[0].dataset.command;
  };
  const add = (role, content) => {
    const item = document.createElement("li");
    item.className = role;
    item.textContent = content;
    list.append(item);
    return item;
  };
  picker.addEventListener("change", () => { messages = []; list.replaceChildren(); showCommand(); });
  document.getElementById("chat-clear").addEventListener("click", () => { messages = []; list.replaceChildren(); });
  showCommand();
  chatForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const content = text.value.trim();
    if (!content) return;
    messages.push({role: "user", content});
    add("user", content);
    text.value = "";
    const pending = add("assistant pending", "…");
    const button = chatForm.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const answer = await post("/api/chat", {run: picker.value, messages});
      pending.textContent = answer.reply || "(an empty reply: the model ended its answer at once)";
      pending.className = answer.reply ? "assistant" : "assistant empty";
      messages.push({role: "assistant", content: answer.reply});
    } catch (err) {
      pending.remove();
      messages.pop();
    }
    button.disabled = false;
  });
}

// Copy buttons: data-copy="TEXT" (the import command of an export).
document.addEventListener("click", async (e) => {
  const button = e.target.closest("button[data-copy]");
  if (!button) return;
  try {
    await navigator.clipboard.writeText(button.dataset.copy);
    button.textContent = "Copied";
  } catch (err) {
    showMessage("The browser did not let the page copy; select the command and copy it yourself.");
  }
});

// Answers page: save a repaired answer (corrections.jsonl) or a fixed reference (fixes.jsonl).
const answers = document.getElementById("answers");
if (answers) {
  for (const form of document.querySelectorAll("form.repair")) {
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const card = form.closest("[data-line]");
      const body = {line: Number(card.dataset.line), text: form.elements.text.value};
      const button = form.querySelector("button");
      button.disabled = true;
      try {
        const answer = await post(`/api/runs/${encodeURIComponent(answers.dataset.run)}/${form.dataset.kind}`, body);
        button.textContent = "Saved";
        card.classList.add("saved");
        if (answer.count !== undefined) {
          document.getElementById("corrections-count").firstChild.textContent =
            `${answer.count} correction${answer.count === 1 ? "" : "s"} saved. `;
          document.getElementById("train-again").hidden = false;
        }
      } catch (err) { /* the message is shown */ }
      button.disabled = false;
    });
  }
}

// Data check page: edited rows and ticked rows saved as a new file, then checked.
const fixForm = document.getElementById("fix-form");
if (fixForm) {
  fixForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const edits = {};
    for (const area of fixForm.querySelectorAll("textarea.edit-row")) {
      if (area.value !== area.defaultValue) edits[area.dataset.line] = area.value;
    }
    const drop = [...new Set([...fixForm.querySelectorAll("input.drop-row:checked")].map((box) => Number(box.value)))];
    const answer = await post("/api/data/fix", {check: fixForm.dataset.check, edits, drop}).catch(() => null);
    if (answer) location.href = answer.url;
  });
}

// Arena: the same prompt to each column, one request per column, each shown when it is made.
const arenaForm = document.getElementById("arena-form");
if (arenaForm) {
  const board = document.getElementById("arena");
  const column = (title, note) => {
    const box = document.createElement("section");
    box.className = "card column";
    const heading = document.createElement("h2");
    heading.textContent = title;
    const small = document.createElement("small");
    small.textContent = note;
    const text = document.createElement("p");
    text.className = "reply pending";
    text.textContent = "waiting …";
    box.append(heading, small, text);
    board.append(box);
    return text;
  };
  arenaForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const runs = [...arenaForm.querySelectorAll("input[name=run]:checked")].map((box) => box.value);
    const prompt = arenaForm.elements.prompt.value.trim();
    if (!runs.length) { showMessage("Tick a run first: its base model and the run itself answer."); return; }
    if (!prompt) return;
    showMessage("");
    board.replaceChildren();
    const folder = board.dataset.runsFolder;
    const jobs = [
      [runs[0], "zero-shot", "base model, zero-shot", `the base of ${runs[0]}, the prompt alone`],
      [runs[0], "few-shot", "base model, few-shot", `the base of ${runs[0]} with training examples before the prompt`],
      ...runs.map((run) => [run, "tuned", run, `tunelab generate ${folder}/${run} --prompt ...`]),
    ].map(([run, kind, title, note]) => [run, kind, column(title, note)]);
    const button = arenaForm.querySelector("button[type=submit]");
    button.disabled = true;
    for (const [run, kind, text] of jobs) {
      try {
        const answer = await post("/api/arena", {run, column: kind, prompt});
        text.textContent = answer.answer || "(an empty answer: the model ended it at once)";
        text.className = answer.answer ? "reply" : "reply empty";
        if (kind === "few-shot") text.parentElement.querySelector("h2").textContent += ` (${answer.shots} examples)`;
      } catch (err) {
        text.textContent = "no answer (see the message above)";
        text.className = "reply empty";
      }
    }
    button.disabled = false;
  });
}

// Teacher page: the command the form equals; the endpoint and consent are checked by the server.
const teacherForm = document.getElementById("teacher-form");
if (teacherForm) {
  const command = document.getElementById("teacher-command");
  const update = () => {
    const form = new FormData(teacherForm);
    const folder = teacherForm.dataset.data;
    const mode = form.get("mode");
    const words = ["tunelab", "data", mode];
    if (mode === "label" && form.get("inputs")) words.push(`${folder}/${form.get("inputs")}`);
    words.push("--teacher", form.get("teacher"), "--model", form.get("model"), "--out", `${folder}/${form.get("out")}`);
    if (form.get("system").trim()) words.push("--system", form.get("system").trim());
    if (form.get("examples")) words.push("--examples", `${folder}/${form.get("examples")}`);
    if (mode === "synth") words.push("--n", form.get("n").trim());
    if (form.get("allow_remote")) words.push("--allow-remote");
    command.textContent = words.map(shellQuote).join(" ");
  };
  teacherForm.addEventListener("input", update);
  update();
  teacherForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = Object.fromEntries(new FormData(teacherForm).entries());
    body.allow_remote = Boolean(body.allow_remote);
    const answer = await post("/api/teacher", body).catch(() => null);
    if (answer) location.href = answer.url;
  });
}

// Review page: each decision is one POST, appended to the decisions file of `tunelab data review`.
const review = document.getElementById("review");
if (review) {
  document.addEventListener("click", async (e) => {
    const button = e.target.closest("button[data-decision]");
    if (!button) return;
    const card = button.closest("[data-key]");
    const body = {file: review.dataset.file, key: card.dataset.key, decision: button.dataset.decision,
                  answer: card.querySelector("textarea").value};
    button.disabled = true;
    try {
      await post("/api/review", body);
      location.reload();
    } catch (err) {
      button.disabled = false;
    }
  });
}
