"use strict";
// The labeling page: shows this browser's question, sends answers, and renders the new state.
// Every text from the server is set with textContent, never parsed as HTML.

const token = new URLSearchParams(location.search).get("token");
const POLL_MS = 3000;
let state = null;
let busy = false;
let renders = 0;
let poll = null;

function $(id) {
  return document.getElementById(id);
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function call(method, path, body) {
  const options = { method, headers: {}, credentials: "same-origin" };
  if (token) options.headers["X-Token"] = token;
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data;
  try {
    data = await response.json();
  } catch {
    data = {};
  }
  if (!response.ok) throw new Error(data.error || `the server answered ${response.status}`);
  return data;
}

function responseCard(response, index, clickable) {
  const card = element(clickable ? "button" : "div", "response");
  if (clickable) {
    card.type = "button";
    card.dataset.index = String(index);
    card.addEventListener("click", () => label(index));
    card.append(element("span", "key", String(index + 1)));
  }
  const text = response.text === "" ? element("div", "text empty", "(empty)") : element("div", "text", response.text);
  card.append(text);
  card.append(element("span", "end", response.ended ? "■ ended here" : "… cut off at the length limit"));
  return card;
}

function renderQuestion(question) {
  const rating = state.kind === "rating";
  $("question").dataset.questionId = String(question.id);
  $("query").textContent = question.query;
  $("responses-title").textContent = rating ? "Continuation" : "Continuations";
  $("responses").replaceChildren(...question.responses.map((r, i) => responseCard(r, i, !rating)));
  $("ratings").hidden = !rating;
  if (rating) {
    $("ratings").replaceChildren(...state.labels.map((value) => {
      const button = element("button", "", String(value));
      button.type = "button";
      button.dataset.value = String(value);
      button.addEventListener("click", () => label(value));
      return button;
    }));
  }
}

function progressText(p) {
  let text = `Labelled ${p.labelled} of ${p.questions} · skipped ${p.skipped} · yours ${p.yours}`;
  if (p.overlapped) text += ` · ${p.overlapped} questions go to two labelers`;
  return text;
}

function percent(rate) {
  return `${(100 * rate).toFixed(0)}%`;
}

function kappaText(kappa) {
  return kappa === null ? "n/a" : kappa.toFixed(2);
}

// The raw rate, the rate chance gives with the labels' observed shares, Cohen's kappa, and per labeler.
function agreementText(a, you) {
  if (!a.doubly_labelled) return "";
  let text = `Agreement: ${percent(a.rate)} (${a.agreed} of ${a.doubly_labelled} questions labelled twice, ${a.rule})`;
  text += `; by chance ${percent(a.chance)}, kappa ${kappaText(a.kappa)}`;
  if (a.within_one_rate !== undefined) {
    text += `; within one point: ${percent(a.within_one_rate)}, kappa ${kappaText(a.within_one_kappa)}`;
  }
  const rows = a.labelers.filter((r) => r.doubly_labelled).map((r) =>
    `labeler ${r.labeler}${r.labeler === you ? " (you)" : ""} ${percent(r.rate)} of ${r.doubly_labelled}`);
  if (rows.length) text += `. Per labeler: ${rows.join(", ")}`;
  return text;
}

function render(next) {
  state = next;
  clearTimeout(poll);
  const p = state.progress;
  document.title = `${p.labelled}/${p.questions} · ${state.title}`;
  $("title").textContent = state.title;
  $("instructions").textContent = state.instructions;
  $("progress-text").textContent = progressText(p);
  $("bar-fill").style.width = `${p.questions ? (100 * p.complete) / p.questions : 0}%`;
  const question = state.question;
  $("question").hidden = !question;
  $("waiting").hidden = Boolean(question);
  if (question) {
    renderQuestion(question);
  } else {
    delete $("question").dataset.questionId;
    const finished = p.complete === p.questions;
    $("waiting-text").textContent = finished
      ? "All questions are answered. Thank you!"
      : "No question for you right now: the others are with other labelers. This page checks again by itself.";
    if (!finished) poll = setTimeout(refresh, POLL_MS);
  }
  const n = state.kind === "rating" ? `${state.labels[0]}–${state.labels[state.labels.length - 1]}` : `1–${state.labels.length}`;
  $("keys").textContent = state.kind === "rating"
    ? `Keys: ${n} rate · s skip · u undo`
    : `Keys: ${n} pick (or click) · s skip · u undo`;
  $("skip").disabled = !question;
  $("undo").disabled = !state.can_undo;
  $("agreement").textContent = agreementText(state.agreement, p.labeler);
  document.body.dataset.renders = String(++renders);
}

function showError(error) {
  $("message").textContent = error.message;
}

async function refresh() {
  try {
    render(await call("GET", "/api/state"));
  } catch (error) {
    showError(error);
  }
}

async function post(path, body) {
  if (busy) return;
  busy = true;
  $("message").textContent = "";
  try {
    render(await call("POST", path, body));
  } catch (error) {
    showError(error);
    await refresh();
  } finally {
    busy = false;
  }
}

function label(value) {
  if (state && state.question) post("/api/label", { id: state.question.id, label: value });
}

function skip() {
  if (state && state.question) post("/api/skip", { id: state.question.id });
}

function undo() {
  if (state && state.can_undo) post("/api/undo", {});
}

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat || !state) return;
  const key = event.key.toLowerCase();
  if (key === "s") skip();
  else if (key === "u") undo();
  else if (/^[1-9]$/.test(key) && state.question) {
    const digit = Number(key);
    if (state.kind === "rating" && state.labels.includes(digit)) label(digit);
    else if (state.kind !== "rating" && digit <= state.labels.length) label(digit - 1);
    else return;
  } else return;
  event.preventDefault();
}

document.addEventListener("keydown", onKey);
$("skip").addEventListener("click", skip);
$("undo").addEventListener("click", undo);
refresh();
