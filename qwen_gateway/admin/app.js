// The admin console: plain DOM code over the admin API (/admin/api). Every value from the server goes
// in through textContent (key names are user input), the admin key stays in this tab's sessionStorage
// and travels only in the Authorization header, and the usage chart is SVG drawn here (no library).
"use strict";

const API = "/admin/api";
const STORE = "qwen-gateway-admin-key";
const COLORS = ["#3559c7", "#e07b39", "#2f9e6e", "#b3261e", "#8a4fbf", "#c9a227", "#2b8cbe", "#7f7f7f"];
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
let keys = [];
let usageRows = [];

function adminKey() {
  return sessionStorage.getItem(STORE);
}

async function call(method, path, body) {
  const used = adminKey();
  const init = { method, headers: { Authorization: "Bearer " + used } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(API + path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    // Log out only if the refused key is still the one in use: a late answer to an earlier (wrong)
    // key must not end the session of the key typed after it.
    if ((response.status === 401 || response.status === 403) && adminKey() === used) {
      logout();
    }
    const message = (data.error && data.error.message) || response.statusText;
    throw new Error(message + " (HTTP " + response.status + ")");
  }
  return data;
}

function showError(error) {
  const box = $("error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "—" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function button(label, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (cls) b.className = cls;
  b.addEventListener("click", onClick);
  return b;
}

// -- keys ------------------------------------------------------------------------------------------

function renderKeys() {
  const body = $("keys-body");
  body.replaceChildren();
  for (const key of keys) {
    const tr = document.createElement("tr");
    tr.dataset.keyId = key.id;
    tr.dataset.keyName = key.name;
    if (key.status !== "active") tr.className = "revoked";
    cell(tr, key.name, "name");
    cell(tr, key.id, "id");
    cell(tr, key.prefix + "…");
    cell(tr, key.status, "status");
    cell(tr, key.metered ? key.balance : "unmetered", "num balance");
    cell(tr, key.held, "num held");
    // Only a metered key is charged: an unmetered key's ledger rows cost it nothing (cost is null).
    cell(tr, key.metered ? key.cost : "not charged", "num cost");
    cell(tr, key.requests, "num requests");
    cell(tr, key.rpm_limit, "num rpm");
    cell(tr, key.tpm_limit, "num tpm");
    const actions = cell(tr, "", "actions");
    actions.textContent = "";
    if (key.status === "active") {
      actions.appendChild(
        button("Revoke", "danger revoke", async () => {
          if (!window.confirm("Revoke key " + key.name + "? Requests with it are refused from now on.")) return;
          await run(() => call("POST", "/keys/" + encodeURIComponent(key.id) + "/revoke"));
        }),
      );
    }
    body.appendChild(tr);
  }
  $("keys-empty").hidden = keys.length > 0;
  for (const id of ["topup-key", "limits-key"]) {
    const select = $(id);
    const chosen = select.value;
    select.replaceChildren();
    for (const key of keys.filter((k) => k.status === "active")) {
      const option = document.createElement("option");
      option.value = key.id;
      option.textContent = key.name;
      select.appendChild(option);
    }
    if (chosen) select.value = chosen;
  }
}

function priceInput(value, cls, label) {
  const input = document.createElement("input");
  input.value = value;
  input.className = cls;
  input.inputMode = "decimal";
  input.size = 10;
  input.setAttribute("aria-label", label);
  return input;
}

function renderPrices(models) {
  const body = $("prices-body");
  body.replaceChildren();
  for (const model of models) {
    const tr = document.createElement("tr");
    tr.dataset.model = model.id;
    cell(tr, model.id, "model");
    const inputCell = cell(tr, "", "num");
    const outputCell = cell(tr, "", "num");
    const input = priceInput(model.input_price, "input-price", model.id + " input price");
    const output = priceInput(model.output_price, "output-price", model.id + " output price");
    inputCell.replaceChildren(input);
    outputCell.replaceChildren(output);
    cell(tr, model.source, "source");
    const actions = cell(tr, "", "actions");
    actions.textContent = "";
    const path = "/models/" + encodeURIComponent(model.id) + "/price";
    actions.appendChild(
      button("Set", "set-price", () =>
        run(() => call("PUT", path, { input_price: input.value.trim(), output_price: output.value.trim() })),
      ),
    );
    if (model.source === "override") {
      actions.appendChild(button("Reset", "secondary reset-price", () => run(() => call("DELETE", path))));
    }
    body.appendChild(tr);
  }
}

function renderPriceHistory(changes) {
  const body = $("price-history-body");
  body.replaceChildren();
  for (const change of changes) {
    const tr = document.createElement("tr");
    cell(tr, change.changed_at);
    cell(tr, change.model);
    cell(tr, change.old_input_price + " / " + change.old_output_price, "num");
    cell(tr, change.new_input_price + " / " + change.new_output_price + (change.reset ? " (default)" : ""), "num");
    cell(tr, change.admin_key_id);
    body.appendChild(tr);
  }
  $("price-history-empty").hidden = changes.length > 0;
}

// -- usage -----------------------------------------------------------------------------------------

function measure(row, metric) {
  if (metric === "cost") return row.cost_micro / 1e6;
  if (metric === "tokens") return row.prompt_tokens + row.completion_tokens;
  return row.requests;
}

function groupOf(row, group) {
  if (group === "model") return row.model;
  return row.key_name || row.key_id || "(no key)";
}

function lastDays(count) {
  const days = [];
  const today = new Date();
  for (let i = count - 1; i >= 0; i--) {
    const d = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - i));
    days.push(d.toISOString().slice(0, 10));
  }
  return days;
}

function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  if (text !== undefined) el.textContent = text;
  return el;
}

function formatValue(value, metric) {
  return metric === "cost" ? value.toFixed(4) : String(Math.round(value));
}

function renderUsage() {
  const group = $("usage-group").value;
  const metric = $("usage-metric").value;
  const days = lastDays(Number($("usage-days").value));
  $("usage-group-head").textContent = group === "model" ? "Model" : "Key";

  // series name -> day -> value, and the totals table.
  const series = new Map();
  const totals = new Map();
  for (const row of usageRows) {
    const name = groupOf(row, group);
    if (!series.has(name)) series.set(name, new Map());
    const perDay = series.get(name);
    perDay.set(row.day, (perDay.get(row.day) || 0) + measure(row, metric));
    const t = totals.get(name) || { requests: 0, tokens: 0, cost: 0 };
    t.requests += row.requests;
    t.tokens += row.prompt_tokens + row.completion_tokens;
    t.cost += row.cost_micro;
    totals.set(name, t);
  }
  const names = [...series.keys()].sort();

  const width = 900, height = 260, left = 64, bottom = 28, top = 12, right = 8;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "usage per day" });
  const stackTop = days.map((day) => names.reduce((sum, n) => sum + (series.get(n).get(day) || 0), 0));
  const max = Math.max(...stackTop, 0) || 1;
  const plotH = height - top - bottom;
  const slot = (width - left - right) / days.length;
  const y = (v) => top + plotH - (v / max) * plotH;
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4;
    chart.appendChild(svg("line", { x1: left, x2: width - right, y1: y(v), y2: y(v), stroke: "#e3e7ee" }));
    chart.appendChild(svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#68717d" }, formatValue(v, metric)));
  }
  days.forEach((day, i) => {
    let base = 0;
    names.forEach((name, s) => {
      const value = series.get(name).get(day) || 0;
      if (value <= 0) return;
      const rect = svg("rect", {
        x: left + i * slot + slot * 0.15,
        y: y(base + value),
        width: Math.max(slot * 0.7, 1),
        height: Math.max(y(base) - y(base + value), 0.5),
        fill: COLORS[s % COLORS.length],
        class: "bar",
        "data-series": name,
        "data-day": day,
      });
      rect.appendChild(svg("title", {}, `${name} ${day}: ${formatValue(value, metric)}`));
      chart.appendChild(rect);
      base += value;
    });
    const every = Math.ceil(days.length / 10);
    if (i % every === 0 || i === days.length - 1) {
      chart.appendChild(svg("text", { x: left + i * slot + slot / 2, y: height - 8, "text-anchor": "middle", "font-size": 11, fill: "#68717d" }, day.slice(5)));
    }
  });
  chart.appendChild(svg("line", { x1: left, x2: width - right, y1: y(0), y2: y(0), stroke: "#68717d" }));
  $("usage-chart").replaceChildren(chart);

  const legend = $("usage-legend");
  legend.replaceChildren();
  names.forEach((name, s) => {
    const item = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = COLORS[s % COLORS.length];
    item.append(swatch, document.createTextNode(name));
    legend.appendChild(item);
  });

  const body = $("usage-body");
  body.replaceChildren();
  for (const name of names) {
    const t = totals.get(name);
    const tr = document.createElement("tr");
    cell(tr, name);
    cell(tr, t.requests, "num");
    cell(tr, t.tokens, "num");
    cell(tr, (t.cost / 1e6).toFixed(4), "num");
    body.appendChild(tr);
  }
}

// -- loading and actions ---------------------------------------------------------------------------

async function refresh() {
  // allSettled, not all: every request has finished when this returns or throws, so none of them
  // answers later into a page that has moved on.
  const settled = await Promise.allSettled([
    call("GET", "/keys"),
    call("GET", "/models"),
    call("GET", "/usage?days=" + encodeURIComponent($("usage-days").value)),
    call("GET", "/prices/history?limit=20"),
  ]);
  const failed = settled.find((r) => r.status === "rejected");
  if (failed) throw failed.reason;
  const [keyList, models, usage, priceChanges] = settled.map((r) => r.value);
  keys = keyList.data;
  usageRows = usage.data;
  renderKeys();
  renderPrices(models.data);
  renderPriceHistory(priceChanges.data);
  renderUsage();
  document.body.dataset.loadedAt = String(Date.now());
}

async function run(action) {
  showError(null);
  try {
    await action();
    await refresh();
  } catch (error) {
    showError(error);
  }
}

function optionalInt(id) {
  // Empty: no limit. Anything but digits is refused here (Number("abc") would travel as null).
  const text = $(id).value.trim();
  if (text === "") return null;
  if (!/^[0-9]+$/.test(text)) throw new Error("a limit must be a whole number: " + text);
  return Number(text);
}

function showConsole(loggedIn) {
  $("login-section").hidden = loggedIn;
  $("console").hidden = !loggedIn;
  $("session").hidden = !loggedIn;
}

function logout() {
  sessionStorage.removeItem(STORE);
  showConsole(false);
}

function wire() {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(STORE, $("admin-key").value.trim());
    $("admin-key").value = "";
    showError(null);
    try {
      await refresh();
      showConsole(true);
    } catch (error) {
      logout();
      showError(error);
    }
  });
  $("logout").addEventListener("click", logout);
  $("refresh").addEventListener("click", () => run(async () => {}));
  $("create-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run(async () => {
      const body = { name: $("create-name").value.trim() };
      const balance = $("create-balance").value.trim();
      if (balance !== "") body.balance = balance;
      const rpm = optionalInt("create-rpm");
      const tpm = optionalInt("create-tpm");
      if (rpm !== null) body.rpm = rpm;
      if (tpm !== null) body.tpm = tpm;
      const created = await call("POST", "/keys", body);
      $("new-key-value").textContent = created.api_key;
      $("new-key").hidden = false;
      $("create-form").reset();
    });
  });
  $("topup-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run(async () => {
      const id = $("topup-key").value;
      await call("POST", "/keys/" + encodeURIComponent(id) + "/topup", { amount: $("topup-amount").value.trim() });
      $("topup-amount").value = "";
    });
  });
  $("limits-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run(async () => {
      const id = $("limits-key").value;
      await call("PATCH", "/keys/" + encodeURIComponent(id) + "/limits", { rpm: optionalInt("limits-rpm"), tpm: optionalInt("limits-tpm") });
    });
  });
  for (const id of ["usage-group", "usage-metric"]) $(id).addEventListener("change", renderUsage);
  $("usage-days").addEventListener("change", () => run(async () => {}));

  if (adminKey()) {
    refresh().then(() => showConsole(true), (error) => { logout(); showError(error); });
  } else {
    showConsole(false);
  }
}

document.addEventListener("DOMContentLoaded", wire);
