// moesaic dashboard: the live fleet page. No framework, nothing from another origin.
// Everything shown comes from the server as JSON and is put on the page as text
// (textContent, createTextNode) or drawn on <canvas>; innerHTML is never used.
"use strict";

(() => {
  const REASONS = {
    no_feasible_set: "no expert set was predicted to fit; the cheapest expert ran",
    expert_failed: "the planned experts failed; a replacement ran outside the budget",
    deadline_missed: "the measured latency was over the budget",
    energy_over: "the measured energy was over the budget",
    unknown: "the budget was not met",
  };
  const COLORS = { measured: "#1f5f99", predicted: "#8a96a6", budget: "#b3261e", miss: "#b3261e" };
  const BOX_COLORS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6"];

  const state = {
    streams: new Map(),
    nodes: new Map(),
    components: new Map(),
    images: new Map(),
    cameras: new Map(),
    errors: [],
    tasks: {},
    ignored: {},
    historyS: 300,
    offset: 0, // server clock - this clock, seconds
  };
  const views = { streams: new Map(), nodes: new Map(), components: new Map(), sensors: new Map() };
  let dirty = false;

  // ------------------------------------------------------------------ DOM helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function setText(node, value) {
    const text = value === null || value === undefined ? "" : String(value);
    if (node.textContent !== text) node.textContent = text;
  }

  function setBadge(node, text, cls) {
    setText(node, text);
    const name = "badge " + String(cls || "unknown").replace(/[^a-z_-]/gi, "-").toLowerCase();
    if (node.className !== name) node.className = name;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function removeEmpty(container) {
    const empty = container.querySelector(":scope > .empty");
    if (empty) empty.remove();
  }

  const fmt = (value, digits = 0) =>
    value === null || value === undefined || !Number.isFinite(value) ? "–" : value.toFixed(digits);
  const pct = (num, den) => (den ? Math.round((100 * num) / den) + "%" : "–");
  const now = () => Date.now() / 1000 + state.offset;

  function clock(t) {
    if (!t) return "–";
    const d = new Date(t * 1000);
    return [d.getHours(), d.getMinutes(), d.getSeconds()].map((v) => String(v).padStart(2, "0")).join(":");
  }

  function ago(t) {
    if (!t) return "never";
    const s = Math.max(0, now() - t);
    return s < 2 ? "just now" : s < 120 ? Math.round(s) + " s ago" : Math.round(s / 60) + " min ago";
  }

  // ------------------------------------------------------------------ state updates

  function applyStreams(list) {
    for (const s of list || []) {
      const key = s.sensor + "/" + s.task;
      const known = state.streams.get(key) || { samples: [], lastSeq: 0 };
      for (const sample of s.samples || []) {
        if (sample[0] > known.lastSeq) {
          known.samples.push(sample);
          known.lastSeq = sample[0];
        }
      }
      Object.assign(known, s, { samples: known.samples, lastSeq: known.lastSeq });
      state.streams.set(key, known);
    }
  }

  function apply(message) {
    if (typeof message.t === "number") state.offset = message.t - Date.now() / 1000;
    if (message.type === "snapshot") {
      state.streams.clear();
      state.nodes.clear();
      state.components.clear();
      state.images.clear();
      state.cameras.clear();
      state.errors = [];
      state.historyS = message.history_s || 300;
    }
    applyStreams(message.streams);
    for (const n of message.nodes || []) state.nodes.set(n.key || n.name, n);
    for (const key of message.removed_nodes || []) state.nodes.delete(key);
    for (const c of message.components || []) state.components.set(c.name, c);
    for (const i of message.images || []) state.images.set(i.sensor + "/" + i.task, i);
    for (const c of message.cameras || []) state.cameras.set(c.sensor, c);
    for (const e of message.errors || []) {
      if (!state.errors.length || e.seq > state.errors[state.errors.length - 1].seq) state.errors.push(e);
    }
    state.errors = state.errors.slice(-50);
    if (message.tasks) state.tasks = message.tasks;
    if (message.ignored) state.ignored = message.ignored;
    const cutoff = now() - state.historyS;
    for (const s of state.streams.values()) {
      while (s.samples.length && s.samples[0][1] < cutoff) s.samples.shift();
    }
    schedule();
  }

  function schedule() {
    if (dirty) return;
    dirty = true;
    requestAnimationFrame(() => {
      dirty = false;
      render();
    });
  }

  // ------------------------------------------------------------------ rendering

  function render() {
    renderSummary();
    renderShares();
    renderStreams();
    renderSensors();
    renderNodes();
    renderComponents();
    renderErrors();
  }

  function renderSummary() {
    const list = document.getElementById("summary");
    const nodes = [...state.nodes.values()];
    const serving = nodes.filter((n) => n.health === "serving").length;
    let results = 0;
    let met = 0;
    for (const t of Object.values(state.tasks)) {
      results += t.results;
      met += t.met;
    }
    const items = [
      ["nodes serving", serving + "/" + nodes.length],
      ["streams", String(state.streams.size)],
      ["results", String(results)],
      ["within budget", pct(met, results)],
    ];
    clear(list);
    for (const [label, value] of items) list.append(el("li", {}, el("b", { text: value }), " " + label));
  }

  function renderShares() {
    const list = document.getElementById("task-shares");
    clear(list);
    for (const [task, t] of Object.entries(state.tasks).sort()) {
      const share = t.results ? t.met / t.results : 0;
      list.append(
        el(
          "li",
          { "data-task": task },
          el("b", { text: task }),
          " ",
          el("span", { class: "pct " + (share >= 0.9 ? "ok" : "bad"), text: pct(t.met, t.results) }),
          " within budget (" + t.met + "/" + t.results + ")",
        ),
      );
    }
  }

  function figureRow(label, measured, predicted, budget, unit) {
    const over = budget > 0 && measured !== null && measured > budget;
    return el(
      "tr",
      {},
      el("td", { text: label }),
      el("td", { class: over ? "over" : null, text: fmt(measured, 1) }),
      el("td", { text: fmt(predicted, 1) }),
      el("td", { text: budget > 0 ? fmt(budget, budget < 10 ? 1 : 0) : "unbounded" }),
      el("td", { text: unit }),
    );
  }

  function streamView(key, s) {
    const title = el("h3", { text: s.task });
    const sub = el("span", { class: "sub", text: s.sensor + (s.kind ? " · " + s.kind : "") });
    const badge = el("span", { class: "badge" });
    const share = el("p", { class: "share" });
    const experts = el("ul", { class: "experts", "aria-label": "experts chosen and gate weights" });
    const figures = el("table", { class: "figures" });
    const reason = el("p", { class: "reason", hidden: "hidden" });
    const lastError = el("p", { class: "lasterror", hidden: "hidden" });
    const latency = el("canvas", { class: "chart", "data-metric": "latency", role: "img" });
    const energy = el("canvas", { class: "chart", "data-metric": "energy", role: "img" });
    const legend = el(
      "div",
      { class: "legend" },
      el("span", {}, el("span", { class: "swatch measured" }), "measured"),
      el("span", {}, el("span", { class: "swatch predicted" }), "predicted"),
      el("span", {}, el("span", { class: "swatch budget" }), "budget"),
      el("span", { text: "● budget missed" }),
    );
    const card = el(
      "article",
      { class: "card stream", "data-stream": key },
      el("div", { class: "card-head" }, title, sub, badge),
      share,
      el("h4", { class: "muted", text: "latest decision" }),
      experts,
      figures,
      reason,
      lastError,
      el("div", { class: "charts" }, latency, energy, legend),
    );
    return { card, badge, share, experts, figures, reason, lastError, latency, energy };
  }

  function renderStreams() {
    const container = document.getElementById("streams");
    const keys = [...state.streams.keys()].sort();
    if (keys.length) removeEmpty(container);
    for (const key of keys) {
      const s = state.streams.get(key);
      let v = views.streams.get(key);
      if (!v) {
        v = streamView(key, s);
        views.streams.set(key, v);
        container.append(v.card);
      }
      const d = s.latest || {};
      setBadge(v.badge, d.budget_met ? "within budget" : "budget missed", d.budget_met ? "ok" : "bad");
      const windowMet = s.samples.filter((x) => x[8]).length;
      setText(
        v.share,
        "within budget " + pct(s.met, s.results) + " of " + s.results + " results; " +
          pct(windowMet, s.samples.length) + " over the last " + Math.round(state.historyS / 60) + " min",
      );
      clear(v.experts);
      for (const e of d.experts || []) {
        const w = e.weight === null ? 0 : Math.max(0, Math.min(1, e.weight));
        const fill = el("span");
        fill.style.width = (100 * w).toFixed(1) + "%";
        const failed = e.status && e.status !== "ok";
        v.experts.append(
          el(
            "li",
            { title: failed ? e.status + (e.error ? ": " + e.error : "") : null },
            el("span", { class: "name" + (failed ? " failed" : ""), text: e.id || e.node + "/" + e.model }),
            el("span", { class: "bar" }, fill),
            el("span", { class: "weight", text: fmt(w * 100, 0) + "%" }),
          ),
        );
      }
      const b = d.budget || {};
      clear(v.figures);
      v.figures.append(
        el("tr", {}, ...["", "measured", "predicted", "budget", ""].map((h) => el("th", { text: h }))),
        figureRow("latency", d.latency_ms, d.predicted_latency_ms, b.latency_ms, "ms"),
        figureRow("energy", d.energy_mj, d.predicted_energy_mj, b.energy_mj, "mJ " + (d.energy_source || "")),
      );
      if (d.budget_met === false) {
        const slug = d.budget_reason || "unknown";
        setText(
          v.reason,
          "Budget missed (frame " + (d.frame_id ?? "–") + "): " + (REASONS[slug] || slug) +
            (d.reason_derived ? " (derived from the figures)" : " [" + slug + "]"),
        );
        v.reason.hidden = false;
      } else if (s.last_miss) {
        const slug = s.last_miss.reason || "unknown";
        setText(v.reason, "Last miss " + ago(s.last_miss.t) + ": " + (REASONS[slug] || slug));
        v.reason.hidden = false;
      } else {
        v.reason.hidden = true;
      }
      const err = s.last_error;
      if (err && now() - err.t < 60) {
        setText(v.lastError, "Error " + ago(err.t) + ": " + err.reason + " — " + err.detail);
        v.lastError.hidden = false;
      } else {
        v.lastError.hidden = true;
      }
      drawChart(v.latency, s.samples, { measured: 2, predicted: 3, budget: 4 }, "latency", "ms");
      drawChart(v.energy, s.samples, { measured: 5, predicted: 6, budget: 7 }, "energy", "mJ");
    }
  }

  function drawChart(canvas, samples, idx, title, unit) {
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(200, canvas.clientWidth);
    const height = Math.max(100, canvas.clientHeight);
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const end = now();
    // the window grows with the data, from one minute up to the history kept
    const first = samples.length ? samples[0][1] : end;
    const span = Math.min(state.historyS, Math.max(60, end - first));
    const start = end - span;
    let dataTop = 0;
    for (const s of samples) {
      for (const i of [idx.measured, idx.predicted]) if (s[i] !== null && s[i] > dataTop) dataTop = s[i];
    }
    // budgets far above the figures would flatten them: those are named, not drawn
    let top = dataTop;
    let offScale = 0;
    for (const s of samples) {
      const b = s[idx.budget];
      if (b > 0 && (b <= 4 * dataTop || dataTop === 0)) top = Math.max(top, b);
      else if (b > 0) offScale = Math.max(offScale, b);
    }
    top = top > 0 ? niceCeil(top * 1.1) : 1;
    const left = 46;
    const right = 8;
    const upper = 18;
    const lower = 18;
    const plotW = width - left - right;
    const plotH = height - upper - lower;
    const x = (t) => left + ((t - start) / (end - start)) * plotW;
    const y = (v) => upper + plotH - (v / top) * plotH;

    ctx.font = "11px 'DejaVu Sans', sans-serif";
    ctx.fillStyle = "#1b2430";
    ctx.textBaseline = "top";
    ctx.fillText(title + " (" + unit + ")", left, 2);
    if (offScale) {
      ctx.fillStyle = COLORS.budget;
      ctx.textAlign = "right";
      ctx.fillText("▲ budget " + fmt(offScale, 0) + " " + unit + " (above the chart)", width - right, 2);
      ctx.textAlign = "left";
    }
    ctx.strokeStyle = "#dde3ea";
    ctx.lineWidth = 1;
    ctx.fillStyle = "#5b6675";
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (let k = 0; k <= 4; k++) {
      const v = (top * k) / 4;
      ctx.beginPath();
      ctx.moveTo(left, Math.round(y(v)) + 0.5);
      ctx.lineTo(width - right, Math.round(y(v)) + 0.5);
      ctx.stroke();
      ctx.fillText(v === 0 || v >= 10 ? v.toFixed(0) : v.toFixed(1), left - 4, y(v));
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let k = 0; k <= 4; k++) {
      const t = start + ((end - start) * k) / 4;
      const back = span * (1 - k / 4);
      const label = k === 4 ? "now" : back >= 120 ? "-" + (back / 60).toFixed(1) + " min" : "-" + Math.round(back) + " s";
      ctx.fillText(label, Math.min(width - right - 14, Math.max(left + 14, x(t))), height - lower + 3);
    }
    ctx.textAlign = "left";
    const visible = samples.filter((s) => s[1] >= start);
    if (!visible.length) {
      ctx.fillStyle = "#5b6675";
      ctx.textBaseline = "middle";
      ctx.fillText("no results in this window", left + 8, upper + plotH / 2);
      return;
    }
    // budget: each request's own, as a level from it to the next request (none where 0 = unbounded)
    ctx.strokeStyle = COLORS.budget;
    ctx.lineWidth = 1.5;
    ctx.setLineDash([]);
    ctx.beginPath();
    visible.forEach((s, i) => {
      const b = s[idx.budget];
      if (!(b > 0 && b <= top)) return;
      const nextT = i + 1 < visible.length ? visible[i + 1][1] : end;
      ctx.moveTo(x(s[1]), y(b));
      ctx.lineTo(x(nextT), y(b));
    });
    ctx.stroke();
    line(ctx, visible, idx.predicted, x, y, COLORS.predicted, [5, 3]);
    line(ctx, visible, idx.measured, x, y, COLORS.measured, []);
    ctx.fillStyle = COLORS.miss;
    for (const s of visible) {
      if (!s[8] && s[idx.measured] !== null) {
        ctx.beginPath();
        ctx.arc(x(s[1]), y(s[idx.measured]), 2.5, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
    ctx.setLineDash([]);
  }

  function line(ctx, samples, i, x, y, color, dash) {
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.setLineDash(dash);
    ctx.beginPath();
    let started = false;
    for (const s of samples) {
      if (s[i] === null) {
        started = false;
        continue;
      }
      if (started) ctx.lineTo(x(s[1]), y(s[i]));
      else ctx.moveTo(x(s[1]), y(s[i]));
      started = true;
    }
    ctx.stroke();
  }

  function niceCeil(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  // sensors: BEV images per LiDAR sensor, the camera frame with its detections

  function sensorView(sensor) {
    const frames = el("div", { class: "frames" });
    const card = el(
      "article",
      { class: "card sensor", "data-sensor": sensor },
      el("div", { class: "card-head" }, el("h3", { text: sensor })),
      frames,
    );
    return { card, frames, items: new Map() };
  }

  function sensorFor(sensor) {
    const container = document.getElementById("sensors");
    let v = views.sensors.get(sensor);
    if (!v) {
      removeEmpty(container);
      v = sensorView(sensor);
      views.sensors.set(sensor, v);
      container.append(v.card);
    }
    return v;
  }

  function renderSensors() {
    // segmentation first, then the other grids of the sensor
    const order = ([key, image]) => (image.task.includes("segmentation") ? "0" : "1") + key;
    for (const [key, image] of [...state.images.entries()].sort((a, b) => order(a).localeCompare(order(b)))) {
      const v = sensorFor(image.sensor);
      let item = v.items.get(key);
      if (!item) {
        const img = el("img", { class: "bev", alt: "BEV " + image.task + " of " + image.sensor, "data-task": image.task });
        const caption = el("figcaption");
        item = { img, caption, version: 0 };
        v.items.set(key, item);
        v.frames.append(el("figure", {}, img, caption));
      }
      if (item.version !== image.version) {
        item.version = image.version;
        item.img.src = image.url;
      }
      setText(item.caption, image.task + " · " + image.width + "×" + image.height + " · " + clock(image.received));
    }
    for (const [sensor, camera] of state.cameras.entries()) {
      if (!camera.url) continue;
      const v = sensorFor(sensor);
      let item = v.items.get("camera");
      if (!item) {
        const canvas = el("canvas", { class: "camera", role: "img", "aria-label": "camera " + sensor });
        const caption = el("figcaption");
        item = { canvas, caption, version: 0, image: new Image() };
        v.items.set("camera", item);
        v.frames.append(el("figure", { class: "camera-figure" }, canvas, caption));
      }
      const boxes = camera.boxes || [];
      setText(
        item.caption,
        (camera.task ? camera.task + ": " + boxes.length + " detections" : "awaiting detections") +
          " · frame " + (camera.frame_id ?? "–") + " · " + clock(camera.received),
      );
      if (item.version !== camera.version) {
        item.version = camera.version;
        const image = new Image();
        image.onload = () => drawCamera(item.canvas, image, camera);
        image.src = camera.url;
        item.image = image;
      }
    }
  }

  function drawCamera(canvas, image, camera) {
    const w = image.naturalWidth || camera.width || 1;
    const h = image.naturalHeight || camera.height || 1;
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(image, 0, 0, w, h);
    const scale = Math.max(1, w / 640);
    ctx.lineWidth = 2 * scale;
    ctx.font = Math.round(12 * scale) + "px 'DejaVu Sans', sans-serif";
    ctx.textBaseline = "bottom";
    for (const box of camera.boxes || []) {
      const [x1, y1, x2, y2] = box.xyxy;
      const color = BOX_COLORS[hash(box.label) % BOX_COLORS.length];
      ctx.strokeStyle = color;
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      const label = box.label + (box.score === null ? "" : " " + box.score.toFixed(2));
      const tw = ctx.measureText(label).width + 6 * scale;
      const th = 15 * scale;
      const ty = y1 - th < 0 ? y1 + th : y1;
      ctx.fillStyle = color;
      ctx.fillRect(x1, ty - th, tw, th);
      ctx.fillStyle = "#000";
      ctx.fillText(label, x1 + 3 * scale, ty - 2 * scale);
    }
  }

  function hash(text) {
    let h = 0;
    for (const c of String(text)) h = (h * 31 + c.charCodeAt(0)) >>> 0;
    return h;
  }

  // nodes and components

  function renderNodes() {
    const container = document.getElementById("nodes");
    const keys = [...state.nodes.keys()];
    for (const [key, v] of views.nodes.entries()) {
      if (!state.nodes.has(key)) {
        v.card.remove();
        views.nodes.delete(key);
      }
    }
    if (keys.length) removeEmpty(container);
    for (const key of keys.sort()) {
      const n = state.nodes.get(key);
      let v = views.nodes.get(key);
      if (!v) {
        const name = el("h3");
        const badge = el("span", { class: "badge" });
        const facts = el("dl", { class: "kv" });
        const models = el("table", { class: "models" });
        const card = el(
          "article",
          { class: "card node", "data-node": key },
          el("div", { class: "card-head" }, name, badge),
          facts,
          el("div", { class: "table-scroll" }, models),
        );
        v = { card, name, badge, facts, models };
        views.nodes.set(key, v);
        container.append(card);
      }
      setText(v.name, n.name);
      setBadge(v.badge, n.health, n.health === "metrics only" ? "metrics-only" : n.health);
      const device = n.device || {};
      const facts = [
        ["address", n.address],
        ["device", [device.kind, device.name].filter(Boolean).join(" · ")],
        ["energy", device.energy_source],
        ["version", n.version],
        ["error", n.error],
        ["seen", n.described_at ? ago(n.described_at) : n.metrics_at ? ago(n.metrics_at) + " (metrics)" : ""],
      ];
      clear(v.facts);
      for (const [k, value] of facts) {
        if (value) v.facts.append(el("dt", { text: k }), el("dd", { text: value }));
      }
      clear(v.models);
      const described = n.models && n.models.length;
      const rows = described ? n.models : n.metrics_models || [];
      v.models.append(el("tr", {}, ...["model", "runs on", "state · queue"].map((h) => el("th", { text: h }))));
      for (const m of rows) {
        const runsOn = [m.engine, m.device, m.provider].filter(Boolean).join(" · ") || "–";
        const queue = described
          ? "queue " + m.queue_depth + (m.expected_wait_ms ? " · " + fmt(m.expected_wait_ms, 0) + " ms" : "")
          : "";
        v.models.append(
          el(
            "tr",
            { "data-model": m.name || m.model },
            el("td", {}, el("b", { text: m.name || m.model }), el("br"), el("span", { class: "muted", text: m.task || "" })),
            el("td", { class: "runs-on", text: runsOn }),
            el(
              "td",
              {},
              described ? m.state || (m.ready ? "ready" : "not ready") : "(metrics)",
              el("br"),
              el("span", { class: "muted", text: queue }),
            ),
          ),
        );
      }
    }
  }

  function renderComponents() {
    const container = document.getElementById("components");
    const names = [...state.components.keys()].sort();
    if (names.length) removeEmpty(container);
    for (const name of names) {
      const c = state.components.get(name);
      let v = views.components.get(name);
      if (!v) {
        const badge = el("span", { class: "badge" });
        const facts = el("dl", { class: "kv" });
        const card = el(
          "article",
          { class: "card component", "data-component": name },
          el("div", { class: "card-head" }, el("h3", { text: name }), badge),
          facts,
        );
        v = { card, badge, facts };
        views.components.set(name, v);
        container.append(card);
      }
      const status = c.status ? c.status : c.health ? c.health : c.metrics_up === undefined ? "unknown" : c.metrics_up ? "online" : "down";
      setBadge(v.badge, status, status);
      const facts = [
        ["kind", c.kind],
        ["address", c.address || c.url],
        ["health", c.status && c.health ? c.health : ""],
        ["metrics", c.metrics_url ? (c.metrics_up ? "up" : "unreachable") + " · " + c.metrics_url : ""],
        ["error", c.error],
      ];
      for (const [label, value] of Object.entries(c.counters || {})) {
        if (value) facts.push([label.replace(/_/g, " "), fmt(value, 0)]);
      }
      const missed = Object.entries(c.violations || {}).filter(([, n]) => n);
      if (missed.length) facts.push(["budgets missed", missed.map(([k, n]) => k + " ×" + fmt(n, 0)).join(", ")]);
      const down = Object.entries(c.experts_up || {}).filter(([, up]) => !up).map(([e]) => e);
      if (down.length) facts.push(["experts down", down.join(", ")]);
      clear(v.facts);
      for (const [k, value] of facts) {
        if (value) v.facts.append(el("dt", { text: k }), el("dd", { text: value }));
      }
    }
  }

  function renderErrors() {
    const list = document.getElementById("errors");
    clear(list);
    for (const e of [...state.errors].reverse()) {
      list.append(
        el(
          "li",
          {},
          clock(e.t) + " " + e.sensor + (e.task ? "/" + e.task : "") + " ",
          el("span", { class: "reason-slug", text: e.reason }),
          " " + e.detail,
        ),
      );
    }
    if (!state.errors.length) list.append(el("li", { class: "empty", text: "No errors." }));
    const ignored = Object.entries(state.ignored).map(([k, n]) => k + " ×" + n);
    setText(document.getElementById("ignored"), ignored.length ? "Messages ignored: " + ignored.join(", ") : "");
  }

  // ------------------------------------------------------------------ live stream

  function connect() {
    const badge = document.getElementById("connection");
    const source = new EventSource("/events");
    source.addEventListener("open", () => setBadge(badge, "live", "live"));
    source.addEventListener("error", () => setBadge(badge, "reconnecting", "reconnecting"));
    for (const kind of ["snapshot", "patch"]) {
      source.addEventListener(kind, (event) => {
        try {
          apply(JSON.parse(event.data));
        } catch (err) {
          console.warn("dashboard: unreadable event", err);
        }
      });
    }
  }

  connect();
  // The time axis moves: redraw once a second (drawing only; updates arrive over the stream).
  setInterval(schedule, 1000);
  window.addEventListener("resize", schedule);
})();
