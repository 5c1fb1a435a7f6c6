// The recsys service dashboard: polls dashboard/data, shows its figures and keeps the
// time series for the charts (Vega-Lite through vega-embed, loaded before this module).
//
// Every reading the server returns is already aggregated over all its workers and its
// rates cover the server-side window, so the series kept here is a plain list of
// (time, value) points, whichever worker answered each poll. Readings are per server:
// when another replica answers (behind a load balancer), the series starts afresh.
//
// URL parameters: ?refresh=<seconds between polls>&window=<seconds of the rate window>.

const KEY_STORAGE = "recsys.dashboard.apiKey";
const SERIES_MINUTES = 15;
const SCHEMA = "https://vega.github.io/schema/vega-lite/v6.json";

const state = {
  config: null,
  views: {},
  series: { calls: [], latency: [], errors: [], fallback: [] },
  timer: null,
  lastGeneratedAt: null,
  host: null,
};

const intFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const rateFormat = new Intl.NumberFormat("en-US", {
  minimumFractionDigits: 2,
  maximumFractionDigits: 2,
});

const fmtInt = (n) => (n == null ? "–" : intFormat.format(n));
const fmtRate = (n) => (n == null ? "–" : `${rateFormat.format(n)}/s`);
const fmtPct = (x) => (x == null ? "–" : `${(x * 100).toFixed(2)}%`);
const fmtMs = (x) => (x == null ? "–" : x.toFixed(1));

function $(id) {
  return document.getElementById(id);
}

function param(name, fallback, low, high) {
  const raw = Number(new URLSearchParams(window.location.search).get(name));
  if (!Number.isFinite(raw) || raw <= 0) return fallback;
  return Math.min(high, Math.max(low, raw));
}

function refreshSeconds() {
  return param("refresh", state.config.refresh_seconds, 1, 60);
}

function windowSeconds() {
  return param("window", state.config.window_seconds, 5, 900);
}

function storedKey() {
  return window.sessionStorage.getItem(KEY_STORAGE);
}

function setStatus(kind, text) {
  const el = $("status");
  el.dataset.state = kind;
  el.textContent = text;
}

function setFigure(name, text, raw) {
  const el = document.querySelector(`[data-figure="${name}"]`);
  el.textContent = text;
  el.dataset.value = raw == null ? "" : String(raw);
}

// ------------------------------------------------------------------ charts

const timeAxis = {
  field: "t",
  type: "temporal",
  title: null,
  axis: { format: "%H:%M:%S", labelOverlap: true, tickCount: 5 },
};

// colorTitle: several series told apart by a legend; null: one series, no legend.
function seriesSpec(yTitle, colorTitle, yFormat) {
  const encoding = {
    x: timeAxis,
    y: { field: "value", type: "quantitative", title: yTitle, axis: { format: yFormat } },
    tooltip: [
      { field: "series", type: "nominal" },
      { field: "t", type: "temporal", format: "%H:%M:%S" },
      { field: "value", type: "quantitative", format: yFormat },
    ],
  };
  if (colorTitle) {
    encoding.color = {
      field: "series",
      type: "nominal",
      title: colorTitle,
      legend: { orient: "bottom", columns: 2, labelLimit: 260 },
    };
  }
  return {
    $schema: SCHEMA,
    width: "container",
    height: 170,
    data: { name: "points" },
    mark: { type: "line", point: { size: 18 }, interpolate: "monotone" },
    encoding,
  };
}

const SPECS = {
  calls: seriesSpec("calls/s", "route status", ",.2f"),
  latency: seriesSpec("ms", "quantile", ",.1f"),
  errors: seriesSpec("5xx/s", null, ",.2f"),
  fallback: seriesSpec("share", null, ".1%"),
  ctr: {
    $schema: SCHEMA,
    width: "container",
    height: 170,
    data: { name: "points" },
    mark: { type: "bar", tooltip: true },
    encoding: {
      y: { field: "model_version", type: "nominal", title: null, axis: { labelLimit: 0 } },
      x: { field: "ctr", type: "quantitative", title: "CTR", axis: { format: ".1%" } },
      tooltip: [
        { field: "model_version", type: "nominal" },
        { field: "ctr", type: "quantitative", format: ".2%" },
        { field: "impressions", type: "quantitative", format: "," },
        { field: "clicks", type: "quantitative", format: "," },
      ],
    },
  },
};

async function ensureCharts() {
  if (Object.keys(state.views).length) return;
  const embed = window.vegaEmbed;
  for (const [name, spec] of Object.entries(SPECS)) {
    const result = await embed(`#chart-${name}`, spec, {
      actions: false,
      renderer: "svg",
      mode: "vega-lite",
    });
    state.views[name] = result.view;
  }
}

async function setChart(name, values) {
  const view = state.views[name];
  view.data("points", values);
  await view.runAsync();
}

// ------------------------------------------------------------------ rendering

function cell(row, text, numeric) {
  const td = document.createElement("td");
  td.textContent = text;
  if (numeric) td.className = "num";
  row.appendChild(td);
  return td;
}

function fillTable(id, rows, build) {
  const body = document.querySelector(`#${id} tbody`);
  const fresh = document.createElement("tbody");
  for (const item of rows) fresh.appendChild(build(item));
  body.replaceWith(fresh);
}

function shortTime(iso) {
  return iso.replace("T", " ").replace(/\.\d+/, "").replace(/(\+00:00|Z)$/, "");
}

function renderFigures(d) {
  setFigure("calls", fmtInt(d.calls.total), d.calls.total);
  setFigure("calls_per_second", fmtRate(d.calls.per_second), d.calls.per_second);
  const rec = d.recommendations;
  setFigure("recommendations", fmtInt(rec.total), rec.total);
  setFigure("recommendations_per_second", fmtRate(rec.per_second), rec.per_second);
  setFigure("errors_5xx", fmtInt(d.errors.total_5xx), d.errors.total_5xx);
  setFigure("errors_per_second", fmtRate(d.errors.per_second), d.errors.per_second);

  const lat = d.latency.window || d.latency.since_start;
  const basis = d.latency.window
    ? `last ${Math.round(d.window.seconds)} s`
    : d.latency.since_start
      ? "since start"
      : "no requests yet";
  setFigure(
    "latency",
    lat ? `${fmtMs(lat.p50_ms)} / ${fmtMs(lat.p95_ms)} / ${fmtMs(lat.p99_ms)} ms` : "–",
    lat ? lat.p99_ms : null,
  );
  setFigure("latency_basis", basis, basis);
  setFigure("fallback_share", fmtPct(rec.fallback_share), rec.fallback_share);
  setFigure(
    "fallback_share_window",
    rec.fallback_share_window == null ? "–" : `${fmtPct(rec.fallback_share_window)} in window`,
    rec.fallback_share_window,
  );
  const ready = d.models.ready;
  setFigure("ready", ready == null ? "–" : ready ? "yes" : "no", ready);
  setFigure(
    "candidate_share",
    d.models.candidate_share ? `candidate gets ${fmtPct(d.models.candidate_share)}` : "no candidate",
    d.models.candidate_share,
  );
}

function renderTables(d) {
  fillTable("models", d.models.workers, (m) => {
    const tr = document.createElement("tr");
    tr.dataset.worker = m.worker;
    tr.dataset.alias = m.alias;
    tr.dataset.version = m.version;
    cell(tr, m.worker);
    cell(tr, m.alias);
    cell(tr, m.version);
    return tr;
  });
  fillTable("ctr", d.ctr, (c) => {
    const tr = document.createElement("tr");
    tr.dataset.modelVersion = c.model_version;
    cell(tr, c.model_version);
    cell(tr, fmtInt(c.impressions), true).dataset.value = c.impressions;
    cell(tr, fmtInt(c.clicks), true).dataset.value = c.clicks;
    cell(tr, fmtPct(c.ctr), true).dataset.value = c.ctr == null ? "" : c.ctr;
    return tr;
  });
  const history = d.history;
  $("history-note").textContent = history.error
    ? `registry history unavailable: ${history.error}`
    : `model source: ${d.source.name}`;
  fillTable("history", history.events, (e) => {
    const tr = document.createElement("tr");
    tr.dataset.kind = e.kind;
    cell(tr, shortTime(e.at));
    cell(tr, e.kind);
    cell(tr, e.alias);
    cell(tr, e.version || "–");
    cell(tr, e.previous || "–");
    cell(tr, e.share == null ? "–" : fmtPct(e.share), true);
    cell(tr, e.reason);
    return tr;
  });
}

function extendSeries(d) {
  if (d.generated_at === state.lastGeneratedAt) return;
  state.lastGeneratedAt = d.generated_at;
  if (d.server.host !== state.host) {
    // Another replica answered: its figures are its own, so its series starts afresh.
    state.host = d.server.host;
    for (const name of Object.keys(state.series)) state.series[name] = [];
  }
  const t = d.generated_at * 1000;
  const s = state.series;
  if (d.window) {
    for (const r of d.calls.by_route) {
      s.calls.push({ t, series: `${r.route} ${r.status}`, value: r.per_second });
    }
    s.errors.push({ t, series: "5xx", value: d.errors.per_second });
    if (d.latency.window) {
      for (const q of ["p50", "p95", "p99"]) {
        s.latency.push({ t, series: q, value: d.latency.window[`${q}_ms`] });
      }
    }
    if (d.recommendations.fallback_share_window != null) {
      s.fallback.push({ t, series: "fallback", value: d.recommendations.fallback_share_window });
    }
  }
  const oldest = t - SERIES_MINUTES * 60 * 1000;
  for (const name of Object.keys(s)) s[name] = s[name].filter((p) => p.t >= oldest);
}

async function render(d) {
  renderFigures(d);
  renderTables(d);
  extendSeries(d);
  await ensureCharts();
  for (const name of ["calls", "latency", "errors", "fallback"]) {
    await setChart(name, state.series[name]);
  }
  await setChart(
    "ctr",
    d.ctr.filter((c) => c.ctr != null),
  );
  const server = $("server");
  server.dataset.host = d.server.host;
  server.textContent = `server ${d.server.host}`;
  const updated = $("updated");
  updated.dataset.generatedAt = String(d.generated_at);
  updated.textContent = `updated ${new Date(d.generated_at * 1000).toLocaleTimeString()}`;
  $("window").textContent = d.window
    ? `rates over the last ${Math.round(d.window.seconds)} s`
    : "rates after the next refresh";
}

// ------------------------------------------------------------------ polling and auth

async function errorDetail(resp) {
  try {
    const body = await resp.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    return resp.statusText;
  }
}

function askForKey(message) {
  clearTimeout(state.timer);
  $("board").hidden = true;
  $("auth").hidden = false;
  const error = $("auth-error");
  error.hidden = !message;
  error.textContent = message || "";
  setStatus("auth", "API key needed");
  $("api-key").focus();
}

async function poll() {
  clearTimeout(state.timer);
  let delay = refreshSeconds() * 1000;
  try {
    const headers = {};
    const key = storedKey();
    if (key) headers[state.config.header] = key;
    const resp = await fetch(`dashboard/data?window=${windowSeconds()}`, {
      headers,
      cache: "no-store",
    });
    if (resp.status === 401 || resp.status === 403) {
      window.sessionStorage.removeItem(KEY_STORAGE);
      askForKey(await errorDetail(resp));
      return;
    }
    if (resp.status === 429) {
      delay = Math.max(delay, 1000 * Number(resp.headers.get("Retry-After") || 1));
      setStatus("error", "throttled: slowing down");
    } else if (!resp.ok) {
      setStatus("error", `HTTP ${resp.status}: ${await errorDetail(resp)}`);
    } else {
      await render(await resp.json());
      setStatus("live", "live");
    }
  } catch (err) {
    setStatus("error", `cannot reach the server (${err.message})`);
  }
  state.timer = setTimeout(poll, delay);
}

function wireAuth() {
  $("auth-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    window.sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    $("auth").hidden = true;
    $("board").hidden = false;
    setStatus("starting", "loading…");
    poll();
  });
  $("forget-key").addEventListener("click", () => {
    window.sessionStorage.removeItem(KEY_STORAGE);
    askForKey("");
  });
}

async function start() {
  try {
    const resp = await fetch("dashboard/config", { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    state.config = await resp.json();
  } catch (err) {
    setStatus("error", `cannot reach the server (${err.message}); retrying`);
    state.timer = setTimeout(start, 5000);
    return;
  }
  wireAuth();
  $("forget-key").hidden = !state.config.auth_required;
  if (state.config.auth_required && !storedKey()) {
    askForKey("");
    return;
  }
  poll();
}

start();
