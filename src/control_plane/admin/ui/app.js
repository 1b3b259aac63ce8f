// switchyard operator page: plain ES2020, no framework, no build step.
// Every string from the server is put in the page with textContent, never
// as HTML. The admin token, when one is needed, lives in this closure only
// (never a cookie or storage). Data comes from GET /api/v1/events (read with
// fetch, since EventSource cannot send Authorization), with a fallback to
// polling /api/v1/stats and /api/v1/services every 2 s.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const COLORS = ["blue", "green"];
  const LABEL = { blue: "BLUE", green: "GREEN" };
  const GLYPH = { blue: "●", green: "▲" };

  let token = null; // memory only
  const cards = new Map(); // service name -> card state
  let lastData = 0;
  let connState = "connecting";

  // ---------- small DOM helpers (text only) ----------
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  }
  function setText(e, s) {
    const t = String(s);
    if (e.textContent !== t) e.textContent = t;
  }
  const pct = (x) => (Number.isInteger(x) ? String(x) : Number(x).toFixed(2)) + " %";
  const weightsText = (w) => `${LABEL.blue} ${pct(w.blue)} / ${LABEL.green} ${pct(w.green)}`;
  const liveText = (live) => (live === "split" ? "SPLIT" : `${LABEL[live]} live`);

  function announce(msg) {
    setText($("announce"), msg);
  }
  function notice(msg, isError) {
    const n = $("notice");
    n.hidden = !msg;
    n.classList.toggle("error", !!isError);
    setText(n, msg || "");
  }

  // ---------- API ----------
  async function api(method, path, body, headers) {
    for (;;) {
      const h = Object.assign({ Accept: "application/json" }, headers || {});
      if (token) h.Authorization = "Bearer " + token;
      const init = { method, headers: h, cache: "no-store", credentials: "omit" };
      if (body !== undefined) {
        h["Content-Type"] = "application/json";
        init.body = JSON.stringify(body);
      }
      const res = await fetch(path, init);
      let data = null;
      try {
        data = await res.json();
      } catch (_) {
        data = null;
      }
      if (res.status === 401) {
        await askToken(token
          ? "That token was refused (401 unauthorized): check it is the SECRET part of a line of the admin token_file, without spaces."
          : "");
        continue; // a 401 changed nothing: retry with the new token
      }
      return { status: res.status, data };
    }
  }
  const errMsg = (r) =>
    (r.data && r.data.error && `${r.data.error.message} (${r.status} ${r.data.error.code})`) ||
    `HTTP ${r.status}`;

  // ---------- token dialog ----------
  let tokenWait = null;
  function askToken(error) {
    if (tokenWait) return tokenWait;
    const d = $("token");
    setText($("token-error"), error || "");
    $("token-input").value = "";
    tokenWait = new Promise((resolve) => {
      const done = () => {
        const v = $("token-input").value.trim();
        if (!v) {
          setText($("token-error"), "Enter a token.");
          return;
        }
        token = v;
        $("token-ok").removeEventListener("click", done);
        $("token-input").removeEventListener("keydown", onKey);
        d.close();
        tokenWait = null;
        resolve();
      };
      const onKey = (e) => {
        if (e.key === "Enter") {
          e.preventDefault();
          done();
        }
      };
      $("token-ok").addEventListener("click", done);
      $("token-input").addEventListener("keydown", onKey);
    });
    d.addEventListener("cancel", (e) => e.preventDefault(), { once: true });
    if (!d.open) d.showModal();
    $("token-input").focus();
    return tokenWait;
  }

  // ---------- confirmation dialog ----------
  function confirmChange(title, change, detail) {
    const d = $("confirm");
    setText($("confirm-title"), title);
    setText($("confirm-change"), change);
    setText($("confirm-detail"), detail || "");
    $("confirm-reason").value = "";
    return new Promise((resolve) => {
      const finish = (ok) => {
        $("confirm-ok").removeEventListener("click", onOk);
        $("confirm-cancel").removeEventListener("click", onCancel);
        d.removeEventListener("close", onClose);
        if (d.open) d.close();
        resolve(ok ? $("confirm-reason").value.trim() : null);
      };
      const onOk = () => finish(true);
      const onCancel = () => finish(false);
      const onClose = () => finish(false); // Esc
      $("confirm-ok").addEventListener("click", onOk);
      $("confirm-cancel").addEventListener("click", onCancel);
      d.addEventListener("close", onClose);
      d.showModal();
      $("confirm-reason").focus();
    });
  }

  // ---------- actions ----------
  async function act(name, action, body, title, change) {
    const c = cards.get(name);
    if (!c) return;
    const gen = c.view.generation;
    const target = body.to || (action === "split" ? "green" : null);
    let detail = `Generation ${gen} → ${gen + 1}.`;
    if (target && c.stats) {
      const p = c.stats.pools[target];
      detail += ` ${LABEL[target]}: ${p.healthy}/${p.backends} backends healthy, 5xx over 60 s ${ratioText(p.error_ratio_60s)}.`;
    }
    const reason = await confirmChange(title, change, detail);
    if (reason === null) return;
    const payload = Object.assign({}, body);
    if (reason) payload.reason = reason;
    const r = await api("POST", `/api/v1/services/${encodeURIComponent(name)}/${action}`, payload, {
      "If-Match": `"${gen}"`,
    });
    if (r.status === 200) {
      notice("");
      updateService(r.data);
      loadHistory(name);
      announce(`${name}: ${action} done, now ${weightsText(r.data.weights)}, generation ${r.data.generation}.`);
      return;
    }
    if (r.status === 412) {
      await refreshAll();
      await loadHistory(name);
      const h = cards.get(name) && cards.get(name).history && cards.get(name).history[0];
      const who = h ? ` by ${h.actor} at ${h.at}${h.reason ? ` (“${h.reason}”)` : ""}` : "";
      notice(
        `Not applied: ${name} changed since this page showed generation ${gen}` +
          ` (now generation ${cards.get(name) ? cards.get(name).view.generation : "?"}${who}).` +
          " The page has been refreshed: review the new state and try again.",
        true,
      );
      return;
    }
    notice(`Not applied: ${errMsg(r)}`, true);
  }

  // ---------- rendering ----------
  function ratioText(r) {
    return r === null || r === undefined ? "—" : (r * 100).toFixed(2) + " %";
  }

  function makeCard(view) {
    const name = view.name;
    const card = { name, view, pools: {}, stats: null, history: null, splitDirty: false };
    const root = el("section", { class: "service", "data-service": name, "aria-labelledby": `svc-${name}` });
    const badge = el("span", { class: "badge" });
    const gen = el("span", { class: "gen" });
    const weights = el("span", { class: "weights" });
    root.append(el("header", {}, el("h2", { id: `svc-${name}`, text: name }), badge, weights, gen));
    const barBlue = el("div", { class: "blue" });
    const barGreen = el("div", { class: "green" });
    const bar = el("div", { class: "bar", role: "img" }, barBlue, barGreen);
    root.append(bar);
    const pools = el("div", { class: "pools" });
    for (const color of COLORS) {
      const p = {};
      p.live = el("span", { class: "live-mark" });
      p.weight = el("span", { class: "pool-weight" });
      p.health = el("span", { class: "health" });
      p.list = el("ul", { "aria-label": `${LABEL[color]} backends` });
      p.rps10 = el("dd", { class: "rate", "data-rate": "rps_10s", text: "…" });
      p.err10 = el("dd", { class: "rate", "data-rate": "error_ratio_10s", text: "…" });
      p.rps60 = el("dd", { class: "rate", "data-rate": "rps_60s", text: "…" });
      p.err60 = el("dd", { class: "rate", "data-rate": "error_ratio_60s", text: "…" });
      const rates = el("dl", { class: "rates" },
        el("dt", { text: "req/s 10 s" }), p.rps10, el("dt", { text: "5xx 10 s" }), p.err10,
        el("dt", { text: "req/s 60 s" }), p.rps60, el("dt", { text: "5xx 60 s" }), p.err60);
      const box = el("div", { class: "pool", "data-pool": color },
        el("h3", {}, el("span", { class: `badge ${color}`, text: `${GLYPH[color]} ${LABEL[color]}` }),
          p.weight, p.live, p.health),
        p.list, rates);
      p.box = box;
      pools.append(box);
      card.pools[color] = p;
    }
    root.append(pools);
    root.append(el("p", { class: "rollout", "data-rollout": "none", text: "Rollout: no rollout (progressive rollouts are not available in this version)." }));

    // actions
    const actions = el("div", { class: "actions" });
    card.switchBtn = {};
    for (const color of COLORS) {
      const b = el("button", { type: "button", class: `to-${color}`, "data-action": "switch", "data-to": color,
        text: `Switch to ${GLYPH[color]} ${LABEL[color]}` });
      b.addEventListener("click", () => {
        const v = card.view;
        act(name, "switch", { to: color }, `Switch ${name} to ${LABEL[color]}`,
          `${name}: ${weightsText(v.weights)} → ${LABEL[color]} 100 %`);
      });
      card.switchBtn[color] = b;
      actions.append(b);
    }
    const rangeId = `split-${name}`;
    const range = el("input", { type: "range", min: "0", max: "100", step: "0.01", id: rangeId,
      "data-split": "range", "aria-label": `${name}: percent of traffic for GREEN` });
    const num = el("input", { type: "number", min: "0", max: "100", step: "0.01", inputmode: "decimal",
      "data-split": "number", "aria-label": `${name}: percent for GREEN (0.01 steps)` });
    const preview = el("span", { class: "split-preview", "aria-hidden": "true" });
    const applyBtn = el("button", { type: "button", "data-action": "split", text: "Apply split…" });
    const syncPreview = () => {
      const g = Number(num.value);
      setText(preview, Number.isFinite(g) ? `${LABEL.green} ${g.toFixed(2)} % / ${LABEL.blue} ${(100 - g).toFixed(2)} %` : "");
    };
    range.addEventListener("input", () => { num.value = Number(range.value).toFixed(2); card.splitDirty = true; syncPreview(); });
    num.addEventListener("input", () => { range.value = num.value; card.splitDirty = true; syncPreview(); });
    applyBtn.addEventListener("click", () => {
      const g = Math.round(Number(num.value) * 100) / 100;
      if (!Number.isFinite(g) || g < 0 || g > 100) {
        notice("Split: enter a percentage for GREEN from 0 to 100 (0.01 steps).", true);
        num.focus();
        return;
      }
      act(name, "split", { green: g }, `Split ${name}`,
        `${name}: ${weightsText(card.view.weights)} → ${LABEL.blue} ${(100 - g).toFixed(2)} % / ${LABEL.green} ${g.toFixed(2)} %`)
        .then(() => { card.splitDirty = false; });
    });
    card.range = range;
    card.num = num;
    card.syncPreview = syncPreview;
    actions.append(el("span", { class: "split" },
      el("label", { for: rangeId, text: `${GLYPH.green} GREEN %` }), range, num, preview, applyBtn));
    const rb = el("button", { type: "button", "data-action": "rollback", text: "Roll back…" });
    rb.addEventListener("click", () => act(name, "rollback", {}, `Roll back ${name}`,
      `${name}: ${weightsText(card.view.weights)} → the pool last live at 100 % before this state`));
    actions.append(rb);
    root.append(actions);

    // history
    const tbody = el("tbody");
    const table = el("table", { class: "history" },
      el("thead", {}, el("tr", {}, ...["gen", "when (UTC)", "actor", "action", "weights", "reason", ""].map((h) => el("th", { scope: "col", text: h })))),
      tbody);
    const det = el("details", { open: "" }, el("summary", { text: "History (newest first)" }), table);
    root.append(det);
    card.tbody = tbody;
    card.root = root;
    card.badge = badge;
    card.genEl = gen;
    card.weightsEl = weights;
    card.bar = bar;
    card.barBlue = barBlue;
    card.barGreen = barGreen;
    return card;
  }

  function updateService(view) {
    let card = cards.get(view.name);
    const main = $("services");
    if (!card) {
      card = makeCard(view);
      cards.set(view.name, card);
      const empty = main.querySelector(".empty");
      if (empty) empty.remove();
      main.append(card.root);
      loadHistory(view.name);
    }
    const genChanged = card.view.generation !== view.generation;
    card.view = view;
    card.root.setAttribute("data-live", view.live);
    card.root.setAttribute("data-generation", String(view.generation));
    card.badge.className = `badge ${view.live}`;
    setText(card.badge, view.live === "split" ? "SPLIT" : `${GLYPH[view.live]} ${LABEL[view.live]} live`);
    setText(card.genEl, `generation ${view.generation}`);
    setText(card.weightsEl, weightsText(view.weights));
    card.barBlue.style.width = `${view.weights.blue}%`;
    card.barGreen.style.width = `${view.weights.green}%`;
    card.bar.setAttribute("aria-label", weightsText(view.weights));
    for (const color of COLORS) {
      const p = card.pools[color];
      const w = view.weights[color];
      setText(p.weight, pct(w));
      setText(p.live, w === 100 ? "LIVE" : w > 0 ? "takes traffic" : "idle");
      const backends = view.pools[color].backends;
      const healthy = backends.filter((b) => b.healthy).length;
      setText(p.health, `${healthy}/${backends.length} healthy`);
      p.healthy = healthy;
      const items = backends.map((b) => el("li", { "data-state": b.state, text: `${b.addr} ${b.state}` }));
      const now = Array.from(p.list.children).map((li) => li.textContent).join("\n");
      if (now !== items.map((li) => li.textContent).join("\n")) p.list.replaceChildren(...items);
      const b = card.switchBtn[color];
      b.disabled = w === 100;
      b.title = w === 100 ? `${LABEL[color]} is live already` : "";
    }
    if (!card.splitDirty || genChanged) {
      if (document.activeElement !== card.range && document.activeElement !== card.num) {
        card.num.value = Number(view.weights.green).toFixed(2);
        card.range.value = String(view.weights.green);
        card.splitDirty = false;
        card.syncPreview();
      }
    }
    if (genChanged) loadHistory(view.name);
  }

  function updateStats(stats) {
    setText($("replica"), stats.replica);
    for (const s of stats.services) {
      const card = cards.get(s.name);
      if (!card) continue;
      card.stats = s;
      for (const color of COLORS) {
        const p = card.pools[color];
        const ps = s.pools[color];
        setText(p.rps10, ps.rps_10s.toFixed(1));
        setText(p.rps60, ps.rps_60s.toFixed(1));
        setText(p.err10, ratioText(ps.error_ratio_10s));
        setText(p.err60, ratioText(ps.error_ratio_60s));
        p.err10.classList.toggle("bad", (ps.error_ratio_10s || 0) > 0.01);
        p.err60.classList.toggle("bad", (ps.error_ratio_60s || 0) > 0.01);
        if (p.healthy !== ps.healthy) refreshServicesSoon();
      }
      if (s.generation !== card.view.generation) refreshServicesSoon();
    }
  }

  async function loadHistory(name) {
    const r = await api("GET", `/api/v1/services/${encodeURIComponent(name)}/history`);
    const card = cards.get(name);
    if (r.status !== 200 || !card || !Array.isArray(r.data)) return;
    card.history = r.data;
    const rows = r.data.slice(0, 50).map((h) => {
      const tr = el("tr", { "data-generation": String(h.generation) });
      tr.append(
        el("td", { text: String(h.generation) }),
        el("td", { class: "when", text: h.at }),
        el("td", { class: "actor", text: h.actor }),
        el("td", { text: h.action }),
        el("td", { text: `${weightsText(h.from)} → ${weightsText(h.to)}` }),
        el("td", { class: "reason", text: h.reason || "" }),
      );
      const td = el("td");
      if (h.generation !== card.view.generation && h.action !== "pool") {
        const b = el("button", { type: "button", "data-action": "rollback-to", "data-generation": String(h.generation),
          text: `Back to gen ${h.generation}…` });
        b.addEventListener("click", () => act(name, "rollback", { to_generation: h.generation },
          `Roll back ${name} to generation ${h.generation}`,
          `${name}: ${weightsText(card.view.weights)} → ${weightsText(h.to)}`));
        td.append(b);
      }
      tr.append(td);
      return tr;
    });
    card.tbody.replaceChildren(...rows);
  }

  let refreshTimer = null;
  function refreshServicesSoon() {
    if (refreshTimer) return;
    refreshTimer = setTimeout(() => { refreshTimer = null; refreshAll(); }, 300);
  }

  async function refreshAll() {
    const r = await api("GET", "/api/v1/services");
    if (r.status !== 200 || !Array.isArray(r.data)) {
      notice(`Cannot read services: ${errMsg(r)}`, true);
      return false;
    }
    seen();
    for (const v of r.data) updateService(v);
    return true;
  }

  // ---------- live data: SSE over fetch, polling fallback ----------
  function seen() {
    lastData = Date.now();
  }
  function setConn(s) {
    connState = s;
    $("conn").setAttribute("data-conn", s);
    tickStatus(); // show it now, not at the next 1 s tick
  }
  function tickStatus() {
    const age = lastData ? Math.round((Date.now() - lastData) / 1000) : null;
    const stale = age === null || age > 5;
    $("services").classList.toggle("stale", stale && lastData !== 0);
    const label = stale && lastData ? "disconnected" : connState;
    if (label === "disconnected") $("conn").setAttribute("data-conn", "disconnected");
    else $("conn").setAttribute("data-conn", connState);
    setText($("conn"), label);
    setText($("updated"), age === null ? "" : `· updated ${age} s ago`);
  }

  function handleEvent(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const i = line.indexOf(":");
      const field = i < 0 ? line : line.slice(0, i);
      const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    seen();
    if (!data.length) return;
    let v;
    try {
      v = JSON.parse(data.join("\n"));
    } catch (_) {
      return;
    }
    if (event === "state" && Array.isArray(v)) v.forEach(updateService);
    else if (event === "stats" && v && Array.isArray(v.services)) updateStats(v);
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  async function streamOnce() {
    const h = { Accept: "text/event-stream" };
    if (token) h.Authorization = "Bearer " + token;
    const res = await fetch("/api/v1/events", { headers: h, cache: "no-store", credentials: "omit" });
    if (res.status === 401) {
      await askToken("That token was refused (401 unauthorized).");
      return true;
    }
    if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
    setConn("streaming");
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buf += value.replace(/\r\n?/g, "\n");
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        handleEvent(buf.slice(0, i));
        buf = buf.slice(i + 2);
      }
    }
  }

  async function pollFor(ms) {
    setConn("polling");
    const end = Date.now() + ms;
    while (Date.now() < end) {
      try {
        const s = await api("GET", "/api/v1/stats");
        if (s.status === 200 && s.data) {
          seen();
          await refreshAll();
          updateStats(s.data);
        }
      } catch (_) {
        /* counted as stale by tickStatus */
      }
      await sleep(2000);
    }
  }

  async function live() {
    let failures = 0;
    for (;;) {
      try {
        const again = await streamOnce();
        if (again) continue;
        failures = 1; // the stream ended (drain, restart): reconnect once at once
      } catch (_) {
        failures += 1;
      }
      if (failures >= 2) {
        await pollFor(10000); // then try the stream again
        failures = 1;
      } else {
        setConn("reconnecting");
        await sleep(1000);
      }
    }
  }

  async function start() {
    setInterval(tickStatus, 1000);
    try {
      await refreshAll();
    } catch (_) {
      notice("Cannot reach the admin API; retrying.", true);
    }
    live();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
