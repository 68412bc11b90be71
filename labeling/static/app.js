// earmark review page: no framework, no build step, no network beyond this server.
// Everything the server sends is put into the page with textContent / value, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { me: null, task: null, flagFocus: 0, energy: null, lang: "" };

async function api(path, options = {}) {
  const res = await fetch(path, {
    method: options.method || "GET",
    headers: options.body ? { "Content-Type": "application/json" } : {},
    body: options.body ? JSON.stringify(options.body) : undefined,
    credentials: "same-origin",
  });
  if (res.status === 401) { showLogin(); throw new Error("signed out"); }
  if (!res.ok && res.status !== 204) {
    let detail = res.statusText;
    try { detail = (await res.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return res;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function show(view) {
  for (const id of ["login-view", "task-view", "progress-view"]) $(id).hidden = id !== view;
}

function showLogin() {
  state.me = null;
  $("nav").hidden = true;
  $("who").textContent = "";
  show("login-view");
  $("token").focus();
}

async function login(event) {
  event.preventDefault();
  $("login-error").textContent = "";
  try {
    await api("/api/login", { method: "POST", body: { token: $("token").value.trim() } });
    $("token").value = "";
    await start();
  } catch (e) {
    $("login-error").textContent = e.message;
  }
}

async function start() {
  const res = await fetch("/api/me", { credentials: "same-origin" });
  if (res.status !== 200) { showLogin(); return; }
  state.me = await res.json();
  $("who").textContent = `${state.me.name} (${state.me.role}) · ${state.me.project}`;
  $("nav").hidden = false;
  $("admin").hidden = state.me.role !== "admin";
  const lang = $("lang");
  lang.replaceChildren();
  for (const code of state.me.locales) lang.append(new Option(code, code));
  const flags = $("flags");
  flags.replaceChildren(el("legend", "Flags"));
  for (const flag of state.me.flags) {
    const label = el("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = flag;
    label.append(box, " " + flag.replace("_", " "));
    flags.append(label);
  }
  const list = $("shortcut-list");
  list.replaceChildren();
  for (const [keys, what] of Object.entries(state.me.shortcuts)) list.append(el("dt", keys), el("dd", what));
  show("task-view");
  await nextTask();
}

async function nextTask(path = "/api/tasks/next") {
  const res = await api(path, { method: "POST", body: {} });
  if (res.status === 204) {
    state.task = null;
    $("task").hidden = true;
    $("empty").hidden = path !== "/api/tasks/next";
    if (path !== "/api/tasks/next") { $("status").textContent = "nothing to go back to"; $("task").hidden = false; }
    return;
  }
  renderTask(await res.json());
}

function renderTask(task) {
  state.task = task;
  $("empty").hidden = true;
  $("task").hidden = false;
  $("status").textContent = "";
  const dur = task.duration_s == null ? "?" : task.duration_s.toFixed(1);
  $("clip-meta").textContent = `task ${task.id} · clip ${task.clip_id} · ${task.source_uri.split("/").pop()} @ ${task.offset_s.toFixed(1)} s · ${dur} s · confidence ${task.confidence == null ? "-" : task.confidence.toFixed(2)}`;
  $("reasons").textContent = (task.reasons || []).join("; ");
  // the transcript: one span per word, coloured by confidence; editable as a whole
  const editor = $("editor");
  editor.replaceChildren();
  const words = task.words || [];
  if (words.length) {
    words.forEach((w, i) => {
      const span = el("span", w.word, "w" + (w.confidence < 0.5 ? " low" : w.confidence < 0.8 ? " mid" : ""));
      span.title = `confidence ${w.confidence.toFixed(2)} · ${w.start_s.toFixed(2)}-${w.end_s.toFixed(2)} s`;
      span.dataset.start = w.start_s;
      editor.append(span);
      if (i < words.length - 1) editor.append(document.createTextNode(" "));
    });
  } else {
    editor.textContent = task.text || "";
  }
  const sentences = $("sentences");
  sentences.replaceChildren();
  (task.sentences || []).forEach((s, i) => sentences.append(el("div", `sentence ${i + 1}: ${s.lang || "no tag"} · ${s.text}`)));
  const lang = $("lang");
  if (task.lang && ![...lang.options].some((o) => o.value === task.lang)) lang.append(new Option(task.lang, task.lang));
  lang.value = task.lang || (lang.options[0] && lang.options[0].value) || "";
  for (const box of $("flags").querySelectorAll("input")) box.checked = false;
  loadAudio(task.clip_id);
}

async function loadAudio(clipId) {
  const audio = $("audio");
  audio.pause();
  const res = await api(`/api/clips/${encodeURIComponent(clipId)}/audio`);
  const bytes = await res.arrayBuffer();
  if (audio.dataset.url) URL.revokeObjectURL(audio.dataset.url);
  const url = URL.createObjectURL(new Blob([bytes], { type: "audio/wav" }));
  audio.dataset.url = url;
  audio.src = url;
  audio.playbackRate = Number($("speed").value);
  try {
    const ctx = new (window.AudioContext || window.webkitAudioContext)();
    const buffer = await ctx.decodeAudioData(bytes.slice(0));
    state.energy = energyStrip(buffer.getChannelData(0), $("energy").width);
    ctx.close();
  } catch (e) {
    state.energy = null;
  }
  drawEnergy();
}

function energyStrip(samples, columns) {
  const per = Math.max(1, Math.floor(samples.length / columns));
  const out = new Float32Array(columns);
  let peak = 1e-9;
  for (let c = 0; c < columns; c++) {
    let sum = 0;
    for (let i = c * per; i < Math.min(samples.length, (c + 1) * per); i++) sum += samples[i] * samples[i];
    out[c] = Math.sqrt(sum / per);
    peak = Math.max(peak, out[c]);
  }
  return out.map((v) => v / peak);
}

function drawEnergy() {
  const canvas = $("energy");
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  const audio = $("audio");
  if (state.energy) {
    g.fillStyle = "#7a93ad";
    state.energy.forEach((v, x) => {
      const h = Math.max(1, v * (canvas.height - 4));
      g.fillRect(x, (canvas.height - h) / 2, 1, h);
    });
  }
  if (audio.duration) {
    g.fillStyle = "#d1242f";
    g.fillRect(Math.floor((audio.currentTime / audio.duration) * canvas.width), 0, 2, canvas.height);
  }
}

function togglePlay() {
  const audio = $("audio");
  if (audio.paused) audio.play(); else audio.pause();
}

function replay() {
  const audio = $("audio");
  audio.currentTime = 0;
  audio.play();
}

function setSpeed(step) {
  const speed = $("speed");
  speed.selectedIndex = Math.min(speed.options.length - 1, Math.max(0, speed.selectedIndex + step));
  $("audio").playbackRate = Number(speed.value);
}

function chosenFlags() {
  return [...$("flags").querySelectorAll("input:checked")].map((b) => b.value);
}

async function submit() {
  if (!state.task) return;
  $("status").textContent = "saving...";
  try {
    await api(`/api/tasks/${state.task.id}/submit`, {
      method: "POST",
      body: { text: $("editor").innerText.replace(/\s+/g, " ").trim(), lang: $("lang").value || null, flags: chosenFlags() },
    });
    await nextTask();
  } catch (e) {
    $("status").textContent = e.message;
  }
}

async function skip() {
  if (!state.task) return;
  try {
    await api(`/api/tasks/${state.task.id}/skip`, { method: "POST" });
    await nextTask();
  } catch (e) {
    $("status").textContent = e.message;
  }
}

async function back() {
  try { await nextTask("/api/tasks/back"); } catch (e) { $("status").textContent = e.message; }
}

function nextFlag() {
  const labels = [...$("flags").querySelectorAll("label")];
  if (!labels.length) return;
  labels.forEach((l) => l.classList.remove("focus"));
  state.flagFocus = (state.flagFocus + 1) % labels.length;
  labels[state.flagFocus].classList.add("focus");
  labels[state.flagFocus].querySelector("input").focus();
}

function onKey(event) {
  if (!state.task || $("task-view").hidden) return;
  const key = event.key.toLowerCase();
  let handled = true;
  if (event.ctrlKey && key === "enter") submit();
  else if ((event.ctrlKey && key === " ") || (event.altKey && key === "p")) togglePlay();
  else if (event.altKey && key === "r") replay();
  else if (event.altKey && key === ",") setSpeed(-1);
  else if (event.altKey && key === ".") setSpeed(1);
  else if (event.altKey && key === "s") skip();
  else if (event.altKey && key === "b") back();
  else if (event.altKey && key === "f") nextFlag();
  else if (event.altKey && key === " ") {
    const box = $("flags").querySelectorAll("input")[state.flagFocus];
    if (box) box.checked = !box.checked;
  } else if (event.altKey && key === "l") $("lang").focus();
  else handled = false;
  if (handled) event.preventDefault();
}

async function showProgress() {
  show("progress-view");
  const data = await (await api("/api/progress")).json();
  const perLang = $("per-lang");
  perLang.replaceChildren();
  const states = ["open", "claimed", "done"];
  const head = el("tr");
  for (const h of ["language", ...states]) head.append(el("th", h));
  perLang.append(head);
  for (const [lang, counts] of Object.entries(data.tasks)) {
    const row = el("tr");
    row.append(el("td", lang), ...states.map((s) => el("td", counts[s] || 0)));
    perLang.append(row);
  }
  const people = $("per-reviewer");
  people.replaceChildren();
  const ph = el("tr");
  for (const h of ["reviewer", "submitted", "skipped", "median s/task", "tasks/hour"]) ph.append(el("th", h));
  people.append(ph);
  for (const [name, r] of Object.entries(data.reviewers)) {
    const row = el("tr");
    const med = r.median_seconds_per_task == null ? "-" : r.median_seconds_per_task.toFixed(1);
    const rate = r.tasks_per_hour == null ? "-" : r.tasks_per_hour.toFixed(0);
    row.append(el("td", name), el("td", r.submits), el("td", r.skips), el("td", med), el("td", rate));
    people.append(row);
  }
  const a = data.agreement;
  $("agreement").textContent = a.clips_seen_by_two_or_more
    ? `Agreement: ${a.identical} of ${a.clips_seen_by_two_or_more} clips reviewed by two or more people got the same text (${(100 * a.rate).toFixed(0)} %).`
    : "Agreement: no clip has been reviewed by two people yet.";
}

async function adminAction(event, path, body) {
  event.preventDefault();
  try {
    await api(path, { method: "POST", body });
    $("admin-status").textContent = "done";
    await showProgress();
  } catch (e) {
    $("admin-status").textContent = e.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", async () => { await fetch("/api/logout", { method: "POST" }); showLogin(); });
  $("nav-task").addEventListener("click", () => { show("task-view"); if (!state.task) nextTask(); });
  $("nav-progress").addEventListener("click", showProgress);
  $("retry").addEventListener("click", () => nextTask());
  $("play").addEventListener("click", togglePlay);
  $("replay").addEventListener("click", replay);
  $("speed").addEventListener("change", () => { $("audio").playbackRate = Number($("speed").value); });
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  $("back").addEventListener("click", back);
  $("editor").addEventListener("click", (event) => {
    const start = event.target.dataset && event.target.dataset.start;
    if (start !== undefined) { $("audio").currentTime = Number(start); $("audio").play(); }
  });
  $("energy").addEventListener("click", (event) => {
    const audio = $("audio");
    if (!audio.duration) return;
    const rect = event.target.getBoundingClientRect();
    audio.currentTime = ((event.clientX - rect.left) / rect.width) * audio.duration;
    audio.play();
  });
  const audio = $("audio");
  audio.addEventListener("timeupdate", () => { $("time").textContent = `${audio.currentTime.toFixed(2)} s`; drawEnergy(); });
  audio.addEventListener("play", () => { $("play").textContent = "Pause"; });
  audio.addEventListener("pause", () => { $("play").textContent = "Play"; });
  $("reopen-form").addEventListener("submit", (e) => adminAction(e, `/api/admin/tasks/${$("reopen-id").value}/reopen`));
  $("reassign-form").addEventListener("submit", (e) =>
    adminAction(e, `/api/admin/tasks/${$("reassign-id").value}/reassign`, { reviewer: $("reassign-to").value }));
  document.addEventListener("keydown", onKey);
  start();
});
