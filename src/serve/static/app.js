// nearspan playground: parse an utterance, show why, correct it, add it as an example.
// Offsets from the API are code points (Python str indices), not UTF-16 units.
"use strict";

const $ = (id) => document.getElementById(id);
const cps = (s) => Array.from(s);

const state = {
  index: null,      // GET /v1/index
  text: "",         // the utterance shown
  prediction: null, // its /v1/parse result
  draft: null,      // {text, intent, spans: [{start, end, label}]}: the example being corrected
  selection: null,  // {start, end} in code points, snapped to words
};

// --- words, as nearspan splits them (BERT's basic tokenizer) ---------------------------

function isPunct(ch) {
  const c = ch.codePointAt(0);
  return (c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126) || /\p{P}/u.test(ch);
}

function segmentWords(text) {
  const words = [];
  let start = -1;
  cps(text).forEach((ch, pos) => {
    const alone = isPunct(ch) || /\p{Script=Han}/u.test(ch);
    if (/\s/u.test(ch) || alone) {
      if (start >= 0) words.push({ s: start, e: pos });
      start = -1;
      if (alone) words.push({ s: pos, e: pos + 1 });
    } else if (start < 0) {
      start = pos;
    }
  });
  if (start >= 0) words.push({ s: start, e: cps(text).length });
  return words;
}

// --- helpers ----------------------------------------------------------------------------

function colour(label) {
  let h = 0;
  for (const ch of label) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return `hsl(${(h * 137) % 360} 70% 82%)`;
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const message = body && body.error ? body.error : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

// --- rendering --------------------------------------------------------------------------

// Renders `text` into `container`: words and gaps as spans carrying their code-point
// offsets (data-s, data-e), `spans` as coloured <mark>s with their label.
function renderText(container, text, spans) {
  container.replaceChildren();
  const chars = cps(text);
  const words = segmentWords(text);
  const piece = (parent, cls, s, e) => {
    const span = el("span", cls, chars.slice(s, e).join(""));
    span.dataset.s = s;
    span.dataset.e = e;
    parent.append(span);
  };
  const plain = (parent, from, to) => {
    let p = from;
    for (const w of words) {
      if (w.e <= from || w.s >= to) continue;
      if (w.s > p) piece(parent, "g", p, w.s);
      piece(parent, "w", Math.max(w.s, from), Math.min(w.e, to));
      p = Math.min(w.e, to);
    }
    if (p < to) piece(parent, "g", p, to);
  };
  let pos = 0;
  spans
    .map((s, i) => ({ ...s, i }))
    .sort((a, b) => a.start - b.start)
    .forEach((s) => {
      if (s.start < pos) return; // overlapping: not shown
      if (s.start > pos) plain(container, pos, s.start);
      const mark = el("mark", "slot");
      mark.dataset.i = s.i;
      mark.dataset.s = s.start;
      mark.dataset.e = s.end;
      mark.dataset.label = s.label;
      mark.style.setProperty("--c", colour(s.label));
      plain(mark, s.start, s.end);
      const tag = el("small", "tag", s.label);
      tag.dataset.skip = "1";
      mark.append(tag);
      container.append(mark);
      pos = s.end;
    });
  if (pos < chars.length) plain(container, pos, chars.length);
}

function renderLegend(labels) {
  const legend = $("legend");
  legend.replaceChildren();
  for (const label of [...new Set(labels)]) {
    const li = el("li", "", label);
    li.style.setProperty("--c", colour(label));
    legend.append(li);
  }
}

function renderPrediction() {
  const p = state.prediction;
  $("result").hidden = false;
  $("intent-label").textContent = p.intent ? p.intent.label : "(no intent)";
  $("intent-score").textContent = p.intent ? p.intent.score.toFixed(3) : "";
  $("intent").classList.remove("active");
  renderText($("text"), p.text, p.slots);
  renderLegend(p.slots.map((s) => s.label));
  $("why").hidden = true;
  state.selection = null;
  state.draft = {
    text: p.text,
    intent: p.intent && p.intent.label !== "oos" ? p.intent.label : "",
    spans: p.slots.map((s) => ({ start: s.start, end: s.end, label: s.label })),
  };
  $("intent-input").value = state.draft.intent;
  $("correct").hidden = false;
  renderSelection();
  renderDraft();
}

function renderDraft() {
  renderText($("draft"), state.draft.text, state.draft.spans);
}

function renderSelection() {
  const sel = state.selection;
  for (const w of $("text").querySelectorAll(".w")) {
    w.classList.toggle("sel", !!sel && +w.dataset.s >= sel.start && +w.dataset.e <= sel.end);
  }
  $("selection").textContent = sel ? `“${cps(state.text).slice(sel.start, sel.end).join("")}” (${sel.start}..${sel.end})` : "select words in the text above";
  $("selection").classList.toggle("muted", !sel);
  $("set-slot").disabled = !sel;
  $("remove-slot").disabled = !sel;
}

// Shows the neighbours behind a decision: the intent (slotIndex < 0) or a slot.
function showWhy(slotIndex) {
  const p = state.prediction;
  const decision = slotIndex < 0 ? p.intent : p.slots[slotIndex];
  if (!decision) return;
  $("intent").classList.toggle("active", slotIndex < 0);
  for (const m of $("text").querySelectorAll("mark.slot")) m.classList.toggle("active", +m.dataset.i === slotIndex);
  $("why-title").textContent = slotIndex < 0
    ? `Why intent “${decision.label}” (${decision.score.toFixed(3)}): the nearest example utterances`
    : `Why “${decision.text}” is ${decision.label} (${decision.score.toFixed(3)}): the nearest labeled spans`;
  const body = $("neighbours").tBodies[0];
  body.replaceChildren();
  for (const n of decision.neighbours) {
    const tr = el("tr", "neighbour");
    const sim = el("td", "sim", n.similarity.toFixed(3));
    const bar = el("span", "bar");
    bar.style.setProperty("width", `${Math.max(0, n.similarity) * 3}rem`);
    sim.append(bar);
    const ex = el("td", "example");
    const chars = cps(n.example);
    if (slotIndex < 0) {
      ex.textContent = n.example;
    } else {
      ex.append(chars.slice(0, n.start).join(""), el("b", "", chars.slice(n.start, n.end).join("")), chars.slice(n.end).join(""));
    }
    tr.append(sim, ex, el("td", "label", n.label));
    body.append(tr);
  }
  if (decision.neighbours.length === 0) body.append(el("tr", "", "no neighbours"));
  $("why").hidden = false;
}

// --- selection → word-snapped offsets -----------------------------------------------------

function boundaryPos(node, offset) {
  if (node.nodeType === Node.TEXT_NODE) {
    const host = node.parentElement;
    if (host.closest("[data-skip]")) return +host.closest("mark").dataset.e;
    const seg = host.closest("[data-s]");
    if (!seg) return null;
    return +seg.dataset.s + cps(node.textContent.slice(0, offset)).length;
  }
  if (!(node instanceof Element)) return null;
  const child = node.childNodes[offset];
  if (child) {
    const target = child instanceof Element && child.dataset.s !== undefined ? child : child instanceof Element ? child.querySelector("[data-s]") : null;
    if (target) return +target.dataset.s;
    if (child.nodeType === Node.TEXT_NODE) return boundaryPos(child, 0);
  }
  const ends = node.querySelectorAll("[data-e]");
  if (node.dataset && node.dataset.e !== undefined) return +node.dataset.e;
  return ends.length ? +ends[ends.length - 1].dataset.e : null;
}

function onSelectionChange() {
  const sel = window.getSelection();
  if (!sel || sel.rangeCount === 0 || sel.isCollapsed || !state.prediction) return;
  const range = sel.getRangeAt(0);
  const text = $("text");
  if (!text.contains(range.startContainer) || !text.contains(range.endContainer)) return;
  const a = boundaryPos(range.startContainer, range.startOffset);
  const b = boundaryPos(range.endContainer, range.endOffset);
  if (a === null || b === null || b <= a) return;
  const covered = segmentWords(state.text).filter((w) => w.s < b && w.e > a);
  if (covered.length === 0) return;
  state.selection = { start: covered[0].s, end: covered[covered.length - 1].e };
  renderSelection();
}

// --- actions ----------------------------------------------------------------------------

async function loadIndex() {
  try {
    const info = await api("/v1/index");
    state.index = info;
    const intents = Object.keys(info.intents);
    $("index-info").textContent = `${info.examples} examples · ${info.slot_labels.length} slot labels · ${intents.length} intents · encoder ${info.encoder.model}`;
    const fill = (id, values) => {
      const list = $(id);
      list.replaceChildren(...values.map((v) => { const o = el("option"); o.value = v; return o; }));
    };
    fill("label-list", info.slot_labels);
    fill("intent-list", intents);
    $("key-row").hidden = !info.writes_need_key;
  } catch (e) {
    $("index-info").textContent = `cannot read the index: ${e.message}`;
  }
}

async function runQuery(text) {
  $("parse-error").hidden = true;
  $("parse-button").disabled = true;
  try {
    const body = await api("/v1/parse", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ texts: [text] }),
    });
    state.text = text;
    state.prediction = body.results[0];
    renderPrediction();
  } catch (e) {
    $("parse-error").textContent = e.message;
    $("parse-error").hidden = false;
  } finally {
    $("parse-button").disabled = false;
  }
}

function setSlot() {
  const sel = state.selection;
  const label = $("slot-label").value.trim();
  if (!sel) return;
  if (!label) {
    setStatus("type or pick a slot label first", true);
    return;
  }
  state.draft.spans = state.draft.spans.filter((s) => s.end <= sel.start || s.start >= sel.end);
  state.draft.spans.push({ start: sel.start, end: sel.end, label });
  state.draft.spans.sort((a, b) => a.start - b.start);
  setStatus("", false);
  renderDraft();
}

function removeSlot() {
  const sel = state.selection;
  if (!sel) return;
  state.draft.spans = state.draft.spans.filter((s) => s.end <= sel.start || s.start >= sel.end);
  renderDraft();
}

function setStatus(message, isError) {
  const s = $("status");
  s.textContent = message;
  s.className = message ? (isError ? "error" : "ok") : "";
}

async function addExample() {
  const example = { text: state.draft.text, spans: state.draft.spans };
  const intent = $("intent-input").value.trim();
  if (intent) example.intent = intent;
  const headers = { "content-type": "application/json" };
  const key = $("api-key").value;
  if (key) headers["x-api-key"] = key;
  $("add-example").disabled = true;
  try {
    const body = await api("/v1/examples", { method: "POST", headers, body: JSON.stringify({ examples: [example] }) });
    await loadIndex();
    await runQuery(state.text);
    setStatus(`added; the index now holds ${body.examples} examples`, false);
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    $("add-example").disabled = false;
  }
}

function init() {
  $("query-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("utterance").value.trim();
    setStatus("", false);
    if (text) runQuery(text);
  });
  $("intent").addEventListener("click", () => showWhy(-1));
  $("text").addEventListener("click", (e) => {
    const mark = e.target.closest("mark.slot");
    const sel = window.getSelection();
    if (mark && (!sel || sel.isCollapsed)) showWhy(+mark.dataset.i);
  });
  document.addEventListener("selectionchange", onSelectionChange);
  $("set-slot").addEventListener("click", setSlot);
  $("remove-slot").addEventListener("click", removeSlot);
  $("intent-input").addEventListener("input", () => { if (state.draft) state.draft.intent = $("intent-input").value.trim(); });
  $("add-example").addEventListener("click", addExample);
  loadIndex();
  $("utterance").focus();
}

init();
