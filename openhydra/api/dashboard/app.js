// OpenHydra node dashboard. Plain browser JavaScript, no dependencies, no build step.
// Polls GET /v1/dashboard/summary every 2 s (one request answers the whole page); the chat playground
// is in chat.js (loaded first: it only defines functions, which run once this file has set up).
"use strict";

const REFRESH_MS = 2000;
const SUMMARY_TIMEOUT_MS = 10000;  // a node that accepts the connection but does not answer (hung, stopped) is down too
const SPARK_POINTS = 60;
const TOKEN_KEY = "openhydra.dashboard.token";

const $ = (id) => document.getElementById(id);
const state = {
  timer: null,
  inFlight: false,
  lastOk: null,
  lastSummary: null,
  prevTokens: null,
  tokenRates: [],
  chat: [],
  abort: null,
};

// ---- small helpers -------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "style") node.setAttribute("style", v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmtNum(x, digits = 0) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return Number(x).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

function fmtDuration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

function fmtParams(n) {
  if (!n) return "–";
  if (n >= 1e9) return (n / 1e9).toFixed(2) + " B";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + " M";
  return fmtNum(n);
}

function span(a, b) { return `[${a}, ${b})`; }

function fillKv(dl, rows) {
  dl.replaceChildren();
  for (const [key, value, cls] of rows) {
    if (value === undefined) continue;
    dl.append(el("dt", {}, key), el("dd", { class: cls || null }, value === null ? "–" : value));
  }
}

function showError(message) {
  const banner = $("error-banner");
  if (!message) { banner.hidden = true; banner.textContent = ""; return; }
  banner.hidden = false;
  banner.textContent = message;
}

function token() { return localStorage.getItem(TOKEN_KEY) || ""; }

function authHeaders(extra = {}) {
  const t = token();
  return t ? { ...extra, Authorization: `Bearer ${t}` } : extra;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

function askForToken(reason) {
  $("token-panel").hidden = false;
  $("token-reason").textContent = reason;
}

// ---- polling -------------------------------------------------------------------------------------
async function refresh() {
  if (state.inFlight) return;
  state.inFlight = true;
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), SUMMARY_TIMEOUT_MS);
  try {
    const response = await fetch("/v1/dashboard/summary",
                                 { headers: authHeaders(), cache: "no-store", signal: controller.signal });
    if (response.status === 401) {
      askForToken(token() ? "The node refused this token (401). Paste the node's api.bearer_token."
                          : "This node's API needs a bearer token (api.bearer_token). It stays in this browser.");
      throw new Error("the node's API needs a bearer token: paste it above");
    }
    if (!response.ok) throw new Error(`summary: ${await errorText(response)}`);
    const summary = await response.json();
    render(summary);
    state.lastOk = Date.now();
    state.lastSummary = summary;
    showError(null);
  } catch (err) {
    const stale = state.lastOk ? ` (showing data from ${new Date(state.lastOk).toLocaleTimeString()})` : "";
    const what = err.name === "AbortError" ? `the node did not answer within ${SUMMARY_TIMEOUT_MS / 1000} s`
      : err instanceof TypeError ? `cannot reach the node: ${err.message}` : err.message;
    showError(`${what}${stale}`);
    setStatus("unreachable", "pill-bad");
  } finally {
    clearTimeout(timer);
    state.inFlight = false;
    renderLastUpdated();
  }
}

function renderLastUpdated() {
  const out = $("last-updated");
  if (!state.lastOk) { out.textContent = "never"; return; }
  const age = (Date.now() - state.lastOk) / 1000;
  out.textContent = `${new Date(state.lastOk).toLocaleTimeString()} (${age < 1 ? "now" : fmtDuration(age) + " ago"})`;
  out.classList.toggle("stale", age > 3 * REFRESH_MS / 1000);
}

function schedule() {
  clearInterval(state.timer);
  if ($("auto-refresh").checked) state.timer = setInterval(refresh, REFRESH_MS);
}

function setStatus(text, cls) {
  const pill = $("status-pill");
  pill.textContent = text;
  pill.className = `pill ${cls}`;
}

// ---- rendering -----------------------------------------------------------------------------------
function render(s) {
  const n = s.node, m = n.model;
  $("version").textContent = `v${n.version}`;
  if (n.ready) setStatus(m && m.degradation_reason ? "degraded" : "ready", m && m.degradation_reason ? "pill-warn" : "pill-ok");
  else if (n.load_error) setStatus("failed", "pill-bad");
  else setStatus("loading", "pill-warn");
  $("headline-model").textContent = m ? `${m.id} · layers ${span(m.span[0], m.span[1])} of ${m.num_layers}` : n.loading_stage;
  renderNode(n);
  renderHardware(s.hardware);
  renderLoad(s.load, s.network);
  renderEarnings(s.earnings);
  renderMetrics(s.metrics, s.generated_at);
  renderCoverage(s.coverage, n);
  renderChatModels(m);
}

function renderNode(n) {
  const m = n.model;
  fillKv($("node-info"), [
    ["status", n.ready ? "ready" : n.load_error ? "failed" : "loading"],
    ["stage", n.loading_stage],
    ["load error", n.load_error || undefined, "bad"],
    ["model", m ? m.id : null, "mono"],
    ["requested", n.requested_model && (!m || n.requested_model !== m.id) ? n.requested_model : undefined, "mono"],
    ["span", m ? `layers ${span(m.span[0], m.span[1])} of ${m.num_layers}` : null],
    ["dtype", m ? m.dtype : null],
    ["family", m ? m.family : null],
    ["parameters", m ? fmtParams(m.parameter_count) : null],
    ["context", m ? fmtNum(m.context_length) + " tokens" : null],
    ["source", m ? m.source : null, "mono small"],
    ["peer id", n.peer_id || undefined, "mono small"],
    ["gRPC", n.grpc_address || undefined, "mono"],
    ["reachable", n.reachable || undefined, "small"],
    ["uptime", fmtDuration(n.uptime_s)],
  ]);
  const deg = $("degradation");
  deg.hidden = !(m && m.degradation_reason);
  deg.textContent = m && m.degradation_reason ? `Degraded: ${m.degradation_reason}` : "";
}

function arithmetic(backend) {
  // a record's backend (ShardRuntime.numerics): "pytorch" says nothing more than the dtype does
  const m = /^pytorch-(\w+)-(lowbit\d*|torch)$/.exec(backend || "");
  if (m) return `${m[1]} on ${m[2].startsWith("lowbit") ? "the low-bit kernel" : "PyTorch's kernels"}`;
  return backend && backend !== "pytorch" ? backend : null;
}

function renderHardware(h) {
  fillKv($("hardware-info"), [
    ["detected", h.detected || undefined],
    ["backend", h.backend || undefined],
    ["accelerators", h.accelerators.length ? h.accelerators.join(", ") : "none (CPU)"],
    ["platform", `${h.platform} · ${h.machine}`],
    ["CPU cores", fmtNum(h.cpu_count)],
    ["memory", h.memory_total_gb !== null ? `${fmtNum(h.memory_available_gb, 1)} GB free of ${fmtNum(h.memory_total_gb, 1)} GB` : null],
    ["torch", h.torch_version ? `${h.torch_version} · ${h.torch_threads} thread(s)` : null],
  ]);
}

function renderLoad(load, network) {
  const pipeline = network.swarm && network.swarm.pipeline;
  const disc = network.swarm && network.swarm.discovery;
  const dht = !disc ? undefined : disc.dht === "reachable" ? "reachable"
    : disc.dht === "recovering" ? `recovering: ${disc.carried_records} known peer(s) not yet re-announced`
    : `unreachable: routing over the peers it knew and this node (${disc.last_error})`;
  fillKv($("load-info"), [
    ["DHT", dht, disc && disc.dht === "unreachable" ? "bad" : null],
    ["sessions (coordinating)", `${load.active_sessions} of ${load.max_concurrent_sessions ?? "–"}`
      + (load.queued_requests ? `, ${load.queued_requests} waiting` : ""), load.queued_requests ? "bad" : null],
    ["sessions (peer cache)", load.peer_sessions ?? undefined],
    ["steps served", load.steps_served !== null ? fmtNum(load.steps_served) : undefined],
    ["steps in flight", load.steps_in_flight ?? undefined],
    ["failovers", pipeline ? fmtNum(pipeline.failovers) : undefined],
    ["banned peers", pipeline ? (pipeline.banned.length ? pipeline.banned.join(", ") : "none") : undefined],
  ]);
}

function renderEarnings(e) {
  const rows = [["economy", e.enabled ? e.mode : "off"]];
  if (!e.enabled) {
    rows.push(["", "This node keeps no ledger (economy=off): nothing is earned or spent. Start it with economy=barter or economy=hydra to earn credits."]);
  } else if (e.error) {
    rows.push(["error", e.error, "bad"]);
  } else {
    const b = e.balance || {}, econ = e.economy || {};
    rows.push(["credits", fmtNum(b.credits, 6), "big"]);
    if (econ.hydra) {
      rows.push(["HYDRA", fmtNum(b.hydra, 6), "big"]);
      rows.push(["staked", fmtNum(b.stake, 6)]);
      rows.push(["escrow", `${fmtNum(b.escrow, 6)} in ${b.open_channels} channel(s)`]);
    }
    rows.push(["settlements", fmtNum(econ.settlements)]);
    if (econ.credits) rows.push(["rate", `1 credit per ${fmtNum(econ.credits.tokens_per_credit)} tokens served, −${fmtNum(econ.credits.decay_per_day * 100, 1)}%/day`]);
    rows.push(["ledger", econ.backend || undefined]);
  }
  fillKv($("earnings-info"), rows);
}

function renderMetrics(mt, at) {
  if (state.prevTokens) {
    const dt = at - state.prevTokens.at;
    if (dt > 0) {
      const rate = Math.max(0, (mt.tokens_generated_total - state.prevTokens.value) / dt);
      state.tokenRates.push(rate);
      if (state.tokenRates.length > SPARK_POINTS) state.tokenRates.shift();
    }
  }
  state.prevTokens = { at, value: mt.tokens_generated_total };
  const last = state.tokenRates.length ? state.tokenRates[state.tokenRates.length - 1] : null;
  fillKv($("metrics-info"), [
    ["tokens/s now", last === null ? "–" : fmtNum(last, 1), "big"],
    ["tokens generated", fmtNum(mt.tokens_generated_total)],
    ["prompt tokens", fmtNum(mt.prompt_tokens_total)],
    ["avg time to 1st token", mt.ttft_avg_s === null ? "–" : `${fmtNum(mt.ttft_avg_s * 1000, 0)} ms`],
    ["HTTP requests", fmtNum(mt.requests_total)],
    ["server errors (5xx)", fmtNum(mt.server_errors_total), mt.server_errors_total ? "bad" : null],
    ["stream errors", fmtNum(mt.stream_errors_total), mt.stream_errors_total ? "bad" : null],
    ["client disconnects", fmtNum(mt.client_disconnects_total)],
    ["rate limited (429)", fmtNum(mt.rate_limited_total)],
  ]);
  drawSpark();
}

function drawSpark() {
  const canvas = $("spark"), ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pts = state.tokenRates;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#2a3442"; ctx.lineWidth = 1;
  ctx.beginPath(); ctx.moveTo(0, h - 0.5); ctx.lineTo(w, h - 0.5); ctx.stroke();
  if (pts.length < 2) return;
  const top = Math.max(1, ...pts) * 1.15, step = w / (SPARK_POINTS - 1), x0 = w - step * (pts.length - 1);
  ctx.beginPath();
  pts.forEach((v, i) => { const x = x0 + i * step, y = h - (v / top) * (h - 4); i ? ctx.lineTo(x, y) : ctx.moveTo(x, y); });
  ctx.strokeStyle = "#4fd1c5"; ctx.lineWidth = 2; ctx.stroke();
  ctx.lineTo(w, h); ctx.lineTo(x0, h); ctx.closePath();
  ctx.fillStyle = "rgba(79, 209, 197, 0.15)"; ctx.fill();
  ctx.fillStyle = "#8b98a9"; ctx.font = "11px sans-serif";
  ctx.fillText(`max ${fmtNum(Math.max(...pts), 1)} tok/s`, 4, 12);
}

function renderCoverage(models, node) {
  const root = $("coverage");
  if (!models.length) {
    root.replaceChildren(el("p", { class: "muted" }, node.ready ? "no coverage information" : `not serving yet: ${node.loading_stage}`));
    return;
  }
  root.replaceChildren(...models.map(renderModelCoverage));
}

function renderModelCoverage(c) {
  const L = Math.max(c.total_layers, 1);
  const pct = (x) => `${(100 * x / L).toFixed(3)}%`;
  const status = c.error ? el("span", { class: "pill pill-bad" }, "lookup failed")
    : c.complete ? el("span", { class: "pill pill-ok" }, "complete")
      : el("span", { class: "pill pill-bad" }, `holes ${c.holes.map(([a, b]) => span(a, b)).join(" ")}`);
  const head = el("div", { class: "cov-head" },
    el("span", { class: "mono strong" }, c.model_id), el("span", { class: "muted" }, ` ${c.role} · ${c.total_layers} layers · ${c.peers.length} peer(s) `), status);
  const maxCount = Math.max(1, ...c.counts);
  const heat = el("div", { class: "cov-track cov-heat", title: "peers per layer" },
    ...c.counts.map((k, i) => el("div", {
      class: k ? "cell" : "cell hole", title: `layer ${i}: ${k} peer(s)`,
      style: `left:${pct(i)};width:${pct(1)};opacity:${k ? 0.35 + 0.65 * k / maxCount : 1}`,
    })));
  const axis = el("div", { class: "cov-track cov-axis" },
    ...axisTicks(c.total_layers).map((t) => el("span", { style: `left:${pct(t)}` }, t)));
  const rows = c.peers.map((p) => {
    const cls = ["cov-bar", p.is_self ? "self" : "", p.banned ? "banned" : ""].join(" ");
    const label = el("div", { class: "cov-label mono", title: p.peer_id }, p.peer_id,
      p.is_self ? el("span", { class: "badge" }, "this node") : null, p.banned ? el("span", { class: "badge bad" }, "banned") : null);
    const info = [p.grpc_address, p.dtype, arithmetic(p.backend), p.age_s !== null ? `announced ${fmtNum(p.age_s, 1)} s ago` : null,
      `load ${fmtNum(p.load * 100, 0)}%`, `${p.active_sessions} session(s)`].filter(Boolean).join(" · ");
    const bar = el("div", { class: cls, style: `left:${pct(p.start)};width:${pct(p.end - p.start)}`, title: info },
      span(p.start, p.end));
    return el("div", { class: "cov-row", "data-peer-id": p.peer_id, "data-start": p.start, "data-end": p.end },
      label, el("div", { class: "cov-track" }, bar));
  });
  const error = c.error ? el("div", { class: "banner banner-error" }, c.error) : null;
  return el("section", { class: "cov-model", "data-model-id": c.model_id },
    head, error,
    el("div", { class: "cov-row" }, el("div", { class: "cov-label muted" }, "coverage"), heat),
    ...rows,
    el("div", { class: "cov-row" }, el("div", { class: "cov-label" }), axis));
}

function axisTicks(L) {
  const step = L <= 16 ? 1 : L <= 40 ? 4 : L <= 100 ? 10 : Math.ceil(L / 10);
  const ticks = [];
  for (let t = 0; t < L; t += step) ticks.push(t);
  ticks.push(L);
  return ticks;
}

// ---- wiring --------------------------------------------------------------------------------------
function init() {
  initChat();
  $("auto-refresh").addEventListener("change", schedule);
  $("token-toggle").addEventListener("click", () => { $("token-panel").hidden = !$("token-panel").hidden; });
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("token-input").value.trim();
    if (value) localStorage.setItem(TOKEN_KEY, value);
    $("token-input").value = "";
    $("token-panel").hidden = true;
    refresh();
  });
  $("token-clear").addEventListener("click", () => { localStorage.removeItem(TOKEN_KEY); refresh(); });
  setInterval(renderLastUpdated, 1000);
  schedule();
  refresh();
}

init();
