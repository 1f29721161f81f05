// The cw dashboard page: draws what the server pushes (server-sent events,
// once a second).  No library: tables, and SVG drawn here.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const QUERY = TOKEN ? "?token=" + encodeURIComponent(TOKEN) : "";
const MAX_WINDOW = 300;      // seconds of the task stream shown at most (the server keeps as many)
const LANE = 18;             // pixels per worker lane
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let updates = 0;

function colour(index) { return `hsl(${(index * 137.5) % 360}, 60%, 55%)`; }

function svg(tag, attrs, parent) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function cell(row, value) {
  const td = row.insertCell();
  td.textContent = value === null || value === undefined ? "-" : String(value);
  return td;
}

function fill(id, rows, columns, decorate) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  for (const r of rows) {
    const tr = body.insertRow();
    for (const c of columns) cell(tr, typeof c === "function" ? c(r) : r[c]);
    if (decorate) decorate(tr, r);
  }
}

function bytes(n) {
  for (const [u, s] of [["T", 2 ** 40], ["G", 2 ** 30], ["M", 2 ** 20], ["K", 2 ** 10]]) {
    if (n >= s) return (n / s).toPrecision(3) + u;
  }
  return n + "B";
}

function machine(w) {
  const r = w.resources || {};
  return Object.entries(r).map(([k, v]) => k + "=" + (/mem/.test(k) ? bytes(v) : v)).join(" ") || "-";
}

function header(v) {
  const s = v.status || {}, m = s.master || {};
  $("master").textContent = m.host ? `master ${m.host} pid ${m.pid} (${m.version || "?"})` : "no status yet";
  const t = s.throughput || {};
  const totals = Object.entries(v.jobs_total || {}).map(([k, n]) => `${n} ${k}`).join(", ");
  $("totals").textContent = `${t.per_s ?? 0} jobs/s, ${s.queued ?? 0} queued, ${s.running ?? 0} running` +
    (totals ? `; ended: ${totals}` : "");
  $("error").hidden = !v.error;
  $("error").textContent = v.error || "";
}

function workers(v) {
  fill("workers", (v.status || {}).workers || [],
       ["id", "host", "pid", "state", (w) => (w.current || []).join(",") || "-", "jobs_done", "failures", machine],
       (tr, w) => { tr.className = "worker"; tr.dataset.worker = w.id; });
}

function stream(v) {
  const area = $("stream");
  const width = area.getBoundingClientRect().width || 900, left = 110;
  const lanes = ((v.status || {}).workers || []).map((w) => w.id);
  for (const b of v.bars) if (!lanes.includes(b[2])) lanes.push(b[2]);
  const names = {};
  for (const w of (v.status || {}).workers || []) names[w.id] = `${w.host}:${w.pid}`;
  area.setAttribute("height", Math.max(40, lanes.length * LANE + 20));
  area.replaceChildren();
  const now = v.t;
  const oldest = Math.min(now, ...v.bars.map((b) => b[4] ?? b[5] ?? now));
  const WINDOW = Math.min(MAX_WINDOW, Math.max(10, Math.ceil((now - oldest) * 1.1)));   // zoomed to what ran
  const x = (t) => left + (width - left) * (1 - (now - t) / WINDOW);
  lanes.forEach((id, i) => {
    svg("text", {x: 2, y: i * LANE + 13, class: "lane-label"}, area).textContent = names[id] || `worker ${id}`;
  });
  for (const [client, job, worker, fn, start, end, outcome] of v.bars) {
    const t0 = start ?? end, t1 = end ?? now;
    if (t1 < now - WINDOW) continue;
    const x0 = Math.max(left, x(t0)), lane = lanes.indexOf(worker);
    const failed = outcome === "raised" || outcome === "lost";
    const bar = svg("rect", {x: x0, y: lane * LANE + 2, width: Math.max(2, x(t1) - x0), height: LANE - 4,
                             fill: colour(fn), class: "bar" + (failed ? " failed" : ""),
                             "data-job": `${client}/${job}`, "data-outcome": outcome || "running"}, area);
    if (failed) svg("circle", {cx: x(t1), cy: lane * LANE + LANE / 2, r: 5, class: "fail-mark"}, area);
    svg("title", {}, bar).textContent = `job ${job} of client ${client}: ${v.functions[fn]} (${outcome || "running"})`;
    bar.addEventListener("click", () => detail(client, job));
  }
  const axis = lanes.length * LANE + 14;
  const step = WINDOW > 60 ? 30 : WINDOW > 20 ? 10 : 2;
  for (let s = 0; s <= WINDOW - step / 2; s += step) {
    svg("text", {x: Math.min(x(now - s), width - 14), y: axis, class: "lane-label", "text-anchor": "middle"}, area)
      .textContent = s ? `-${s}s` : "now";
  }
  $("window").textContent = WINDOW;
  $("legend").replaceChildren(...v.functions.map((name, i) => {
    const span = document.createElement("span");
    span.innerHTML = `<i style="background:${colour(i)}"></i>`;
    span.append(name);
    return span;
  }));
}

function rates(v) {
  const area = $("rates"), width = area.getBoundingClientRect().width || 400, height = 110;
  area.replaceChildren();
  const samples = v.samples.slice(-300);
  if (samples.length < 2) return;
  const t0 = samples[0][0], t1 = samples[samples.length - 1][0];
  const line = (k, css) => {
    const top = Math.max(1, ...samples.map((s) => s[k]));
    const points = samples.map((s) => `${(s[0] - t0) / Math.max(1, t1 - t0) * width},${height - s[k] / top * (height - 10)}`);
    svg("polyline", {points: points.join(" "), fill: "none", stroke: css, "stroke-width": 1.5}, area);
    svg("text", {x: 2, y: k === 1 ? 10 : 22, class: "lane-label", fill: css}, area).textContent = `max ${top}`;
  };
  line(1, "#2a7ab9");
  line(2, "#e08a1e");
}

function queues(v) {
  const s = v.status || {};
  fill("queues", s.queues || [], ["client", "priority", "queued"]);
  fill("waiting", s.waiting || [], ["client", "count", (w) => w.since_s + " s", "reason"]);
  fill("limits", Object.entries(s.limits || {}).map(([tag, l]) => ({tag, ...l})), ["tag", "running", "limit"]);
}

function failures(v) {
  const box = $("failures");
  if (!v.failures.length) return;
  box.replaceChildren(...v.failures.map((f) => {
    const d = document.createElement("details");
    d.className = "failure";
    const when = new Date(f.end * 1000).toLocaleTimeString();
    d.innerHTML = "<summary></summary><pre></pre>";
    d.firstChild.textContent = `${when} job ${f.job} of client ${f.client}: ${f.function} ${f.outcome}`;
    d.lastChild.textContent = f.traceback || "(no traceback: " + f.outcome + ")";
    return d;
  }));
}

async function detail(client, job) {
  const answer = await fetch(`/api/stream/${client}/${job}${QUERY}`);
  const j = await answer.json();
  $("detail").hidden = false;
  $("detail-title").textContent = `${job} of client ${client}`;
  $("detail-facts").innerHTML = "";
  for (const k of ["function", "worker", "outcome", "start", "end"]) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = k === "start" || k === "end" ? (j[k] ? new Date(j[k] * 1000).toISOString() : "-") : (j[k] ?? "-");
    $("detail-facts").append(dt, dd);
  }
  $("detail-output").textContent = j.output || j.error || "(nothing printed)";
  $("detail-traceback").textContent = j.traceback || "-";
}

$("detail-close").addEventListener("click", () => { $("detail").hidden = true; });

const source = new EventSource("/events" + QUERY);
source.onmessage = (event) => {
  const v = JSON.parse(event.data);
  updates += 1;
  $("updates").textContent = updates;
  header(v); workers(v); stream(v); rates(v); queues(v); failures(v);
};
source.onerror = () => { $("error").hidden = false; $("error").textContent = "lost the dashboard; retrying…"; };
