
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

function gateColor(g) {
  g = Math.min(Math.max(g, 0), 1);
  const ramp = DATA.ramp;
  for (let i = 1; i < ramp.length; i++) {
    const [lo, a] = ramp[i - 1], [hi, b] = ramp[i];
    if (g <= hi) {
      const w = (g - lo) / (hi - lo);
      return "rgb(" + a.map((c, k) => Math.round(c + w * (b[k] - c))).join(",") + ")";
    }
  }
  return "rgb(" + ramp[ramp.length - 1][1].join(",") + ")";
}

function el(tag, attrs, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const fmt = (x, d = 3) => (x === null || x === undefined ? "-" : Number(x).toFixed(d));
const pct = (x) => (x === null || x === undefined ? "-" : (100 * x).toFixed(1) + "%");
const signed = (x, d = 3) => (x >= 0 ? "+" : "") + Number(x).toFixed(d);

function barChart(values, labels, colors, maxValue) {
  const w = 300, h = 140, pad = 22, bw = (w - pad) / values.length;
  const svg = el("svg:svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}` });
  const top = maxValue || Math.max(1, ...values);
  values.forEach((v, i) => {
    const bh = (h - 2 * pad) * (v / top);
    svg.appendChild(el("svg:rect", { x: pad + i * bw + 1, y: h - pad - bh, width: bw - 2, height: bh, fill: colors[i] }));
    svg.appendChild(el("svg:text", { x: pad + i * bw + bw / 2, y: h - pad + 12, "text-anchor": "middle" }, labels[i]));
    const shown = maxValue ? v.toFixed(2) : String(v);
    svg.appendChild(el("svg:text", { x: pad + i * bw + bw / 2, y: h - pad - bh - 3, "text-anchor": "middle" }, shown));
  });
  svg.appendChild(el("svg:line", { x1: pad, x2: w, y1: h - pad, y2: h - pad, stroke: "#9ca3af" }));
  return svg;
}

function lineChart(points, series) {
  const w = 360, h = 140, left = 34, right = 8, top = 10, bottom = 22;
  const svg = el("svg:svg", { width: w, height: h + 18, viewBox: `0 0 ${w} ${h + 18}` });
  const xs = points.map((p) => p.step);
  const all = series.flatMap((s) => points.map((p) => p[s.key]).filter((v) => v !== null && v !== undefined));
  if (!points.length || !all.length) return svg;
  let lo = Math.min(0, ...all), hi = Math.max(1, ...all);
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  const X = (x) => left + (x1 === x0 ? (w - left - right) / 2 : ((x - x0) / (x1 - x0)) * (w - left - right));
  const Y = (y) => top + (1 - (y - lo) / (hi - lo)) * (h - top - bottom);
  [lo, (lo + hi) / 2, hi].forEach((t) => {
    svg.appendChild(el("svg:line", { x1: left, x2: w - right, y1: Y(t), y2: Y(t), stroke: "#e5e7eb" }));
    svg.appendChild(el("svg:text", { x: left - 4, y: Y(t) + 3, "text-anchor": "end" }, (Math.abs(t) < 0.005 ? 0 : t).toFixed(2)));
  });
  svg.appendChild(el("svg:text", { x: X(x0), y: h - 6, "text-anchor": x1 === x0 ? "middle" : "start" }, "step " + x0));
  if (x1 !== x0) svg.appendChild(el("svg:text", { x: X(x1), y: h - 6, "text-anchor": "end" }, "step " + x1));
  series.forEach((s, k) => {
    const pts = points.filter((p) => p[s.key] !== null && p[s.key] !== undefined);
    svg.appendChild(el("svg:polyline", { points: pts.map((p) => X(p.step) + "," + Y(p[s.key])).join(" "), fill: "none", stroke: s.color, "stroke-width": 2, "stroke-dasharray": s.dash || "" }));
    pts.forEach((p) => svg.appendChild(el("svg:circle", { cx: X(p.step), cy: Y(p[s.key]), r: 2.5, fill: s.color })));
    svg.appendChild(el("svg:rect", { x: left + k * 110, y: h + 6, width: 10, height: 10, fill: s.color }));
    svg.appendChild(el("svg:text", { x: left + k * 110 + 14, y: h + 15 }, s.label));
  });
  return svg;
}

function card(name, value) {
  const div = el("div", { class: "card" });
  div.appendChild(el("div", { class: "value" }, value));
  div.appendChild(el("div", { class: "name" }, name));
  return div;
}

function tokenTable(table, rows) {
  table.replaceChildren();
  const head = el("tr");
  ["token", "count", "mean gate", "mean gap"].forEach((h) => head.appendChild(el("th", {}, h)));
  table.appendChild(head);
  rows.forEach((r) => {
    const tr = el("tr");
    const cell = el("td");
    cell.appendChild(el("span", { class: "tok", style: "background:" + gateColor(r.gate) }, r.token));
    tr.appendChild(cell);
    [String(r.count), fmt(r.gate), signed(r.gap)].forEach((v) => tr.appendChild(el("td", {}, v)));
    table.appendChild(tr);
  });
}

let current = null;

function render(index) {
  const step = DATA.steps[index];
  current = step;
  const s = step.summary;
  $("stepinfo").textContent = `${s.turn_samples} turn-samples in ${s.episodes} episodes, ${s.tokens} tokens, beta ${s.beta}`;
  const cards = $("cards");
  cards.replaceChildren(
    card("mean gate", fmt(s.gate_mean)),
    card(`active (gate > ${DATA.active_gate})`, pct(s.active_ratio)),
    card("mean gap T - S", signed(s.gap_mean)),
    card("tokens", String(s.tokens)),
  );
  const bins = s.histogram.length;
  $("histogram").replaceChildren(barChart(
    s.histogram,
    s.histogram.map((_, i) => (i / bins).toFixed(1)),
    s.histogram.map((_, i) => gateColor((i + 0.5) / bins)),
  ));
  $("byturn").replaceChildren(barChart(
    s.turns.map((t) => t.gate_mean),
    s.turns.map((t) => "turn " + t.turn),
    s.turns.map((t) => gateColor(t.gate_mean)),
    1,
  ));
  tokenTable($("endorsed"), s.endorsed);
  tokenTable($("rejected"), s.rejected);

  const episodes = $("episodes");
  episodes.replaceChildren();
  let box = null, shown = null;
  step.records.forEach((r, ri) => {
    if (r.episode !== shown) {
      shown = r.episode;
      box = el("div", { class: "episode" });
      const h = el("h2", {}, `episode ${r.episode} `);
      h.appendChild(el("span", {}, `${r.task_id} (${r.task_type})`));
      box.appendChild(h);
      episodes.appendChild(box);
    }
    const turn = el("div", { class: "turn" });
    const meta = el("div", { class: "meta" });
    meta.appendChild(el("b", {}, `turn ${r.turn}`));
    meta.appendChild(document.createTextNode("  action "));
    meta.appendChild(el("b", {}, r.action === null ? "(none)" : r.action));
    meta.appendChild(el("span", { class: r.valid ? "" : "invalid" }, r.valid ? " valid" : " invalid"));
    const meanGate = r.g.reduce((a, b) => a + b, 0) / Math.max(1, r.g.length);
    meta.appendChild(document.createTextNode(`  ·  reward ${fmt(r.reward, 2)}  ·  advantage ${signed(r.advantage, 2)}  ·  mean gate ${fmt(meanGate)}`));
    turn.appendChild(meta);
    const tokens = el("div", { class: "tokens" });
    r.tokens.forEach((t, ti) => {
      tokens.appendChild(el("span", { class: "tok", "data-r": ri, "data-t": ti, style: "background:" + gateColor(r.g[ti]) }, t));
    });
    turn.appendChild(tokens);
    box.appendChild(turn);
  });
}

function tipText(r, i) {
  const gap = r.t[i] - r.s[i];
  return [
    ["token", JSON.stringify(r.tokens[i])],
    ["student log-prob S", fmt(r.s[i])],
    ["teacher log-prob T", fmt(r.t[i])],
    ["gap T - S", signed(gap)],
    ["gate", fmt(r.g[i])],
    ["advantage", signed(r.advantage)],
  ];
}

function showTip(event) {
  const target = event.target.closest(".tok[data-r]");
  const tip = $("tip");
  if (!target) { tip.hidden = true; return; }
  const r = current.records[Number(target.dataset.r)];
  const rows = tipText(r, Number(target.dataset.t));
  tip.replaceChildren(...rows.map(([k, v]) => { const d = el("div", {}, k + ": "); d.appendChild(el("b", {}, v)); return d; }));
  tip.hidden = false;
  const x = Math.min(event.clientX + 12, window.innerWidth - tip.offsetWidth - 8);
  const y = event.clientY + 16 + tip.offsetHeight > window.innerHeight ? event.clientY - tip.offsetHeight - 8 : event.clientY + 16;
  tip.style.left = x + "px";
  tip.style.top = y + "px";
}

function init() {
  $("title").textContent = (DATA.fresh ? "Gates of fresh rollouts of " : "Gates of run ") + DATA.source;
  const legend = $("legend");
  legend.appendChild(el("span", { class: "label" }, "gate"));
  for (let i = 0; i <= 10; i += 2) {
    legend.appendChild(el("span", { class: "swatch", style: "background:" + gateColor(i / 10) }, (i / 10).toFixed(1)));
  }
  legend.appendChild(el("span", { class: "label" }, "0 = rejected by the teacher, 1 = endorsed"));
  const select = $("step");
  DATA.steps.forEach((s, i) => select.appendChild(el("option", { value: i }, "step " + s.step)));
  const selected = Math.max(0, DATA.steps.findIndex((s) => s.step === DATA.selected));
  select.value = String(selected);
  select.addEventListener("change", () => render(Number(select.value)));
  $("curve").replaceChildren(lineChart(DATA.curve, [
    { key: "gate_mean", label: "mean gate", color: "#2563eb" },
    { key: "active_ratio", label: "active ratio", color: "#16a34a", dash: "5 3" },
    { key: "gap_mean", label: "mean gap", color: "#dc2626" },
  ]));
  document.addEventListener("mouseover", showTip);
  document.addEventListener("mousemove", (e) => { if (!$("tip").hidden) showTip(e); });
  render(selected);
}

init();
