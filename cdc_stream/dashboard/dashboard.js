// Live view of the cdc-stream events of the server that serves this page.
//
// The page reads /api/realtime with EventSource. The browser reconnects by
// itself after a dropped connection and sends Last-Event-ID, so the server
// resumes where the page stopped. When the browser gives up (an error
// response), the page opens a new stream with `from` set to the last event id.
// Row values are always inserted as text, never as HTML.

"use strict";

const MAX_ROWS = 500;
const CHART_SECONDS = 60;
const RECONNECT_MIN_MS = 1000;
const RECONNECT_MAX_MS = 30000;
const TOKEN_KEY = "cdc-stream-token";

const state = {
  source: null,
  lastId: null,
  paused: false,
  reconnectDelay: RECONNECT_MIN_MS,
  reconnectTimer: null,
  counts: new Map(),
  keyColumns: new Map(),
  buckets: new Array(CHART_SECONDS).fill(0),
  token: null,
};

const $ = (selector) => document.querySelector(selector);

// A number whose JSON text a JavaScript number would change, such as a
// bigint beyond 2^53 or a numeric with more digits than a double holds.
class ExactNumber {
  constructor(text) {
    this.text = text;
  }

  toString() {
    return this.text;
  }
}

// Parse JSON, keeping numbers exact where the browser supports reading the
// source text of a value (JSON.parse source text access, Chrome 114).
function parseExact(text) {
  return JSON.parse(text, (key, value, context) => {
    if (typeof value === "number" && context && typeof context.source === "string") {
      if (String(value) !== context.source) {
        return new ExactNumber(context.source);
      }
    }
    return value;
  });
}

function formatJson(value, indent = "") {
  if (value instanceof ExactNumber) {
    return value.text;
  }
  if (Array.isArray(value)) {
    if (value.length === 0) {
      return "[]";
    }
    const inner = indent + "  ";
    const items = value.map((item) => inner + formatJson(item, inner));
    return "[\n" + items.join(",\n") + "\n" + indent + "]";
  }
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value);
    if (keys.length === 0) {
      return "{}";
    }
    const inner = indent + "  ";
    const items = keys.map(
      (key) => inner + JSON.stringify(key) + ": " + formatJson(value[key], inner),
    );
    return "{\n" + items.join(",\n") + "\n" + indent + "}";
  }
  return JSON.stringify(value);
}

function setState(name) {
  const element = $("#state");
  element.dataset.state = name;
  element.textContent = name;
}

function setMessage(text) {
  $("#message").textContent = text;
}

function loadToken() {
  const match = location.hash.match(/access_token=([^&]+)/);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    // Keeps the token out of the address bar and the browser history.
    history.replaceState(null, "", location.pathname + location.search);
  }
  state.token = sessionStorage.getItem(TOKEN_KEY);
}

function selectedValues(selector) {
  return Array.from(document.querySelectorAll(selector))
    .filter((input) => input.checked)
    .map((input) => input.value);
}

function streamUrl(from) {
  const params = new URLSearchParams();
  const channels = selectedValues("#channel-list input");
  if (channels.length > 0) {
    params.set("channels", channels.join(","));
  }
  const operations = selectedValues("input[name=operation]");
  if (operations.length > 0) {
    params.set("operations", operations.join(","));
  }
  for (const line of $("#row-filters").value.split("\n")) {
    if (line.trim()) {
      params.append("filter", line.trim());
    }
  }
  if (from) {
    params.set("from", from);
  }
  if (state.token) {
    // EventSource cannot send headers; the server removes this parameter
    // from its logs.
    params.set("access_token", state.token);
  }
  return "/api/realtime?" + params.toString();
}

function connect(from) {
  disconnect();
  clearTimeout(state.reconnectTimer);
  setState("connecting");
  const url = streamUrl(from);
  const source = new EventSource(url);
  state.source = source;

  source.onopen = () => {
    setState("live");
    state.reconnectDelay = RECONNECT_MIN_MS;
  };
  source.onmessage = (event) => receive(event);
  source.onerror = () => {
    if (source !== state.source) {
      return;
    }
    if (source.readyState === EventSource.CONNECTING) {
      // The browser retries by itself and sends Last-Event-ID.
      setState("reconnecting");
      return;
    }
    setState("disconnected");
    explainFailure(url).then((status) => {
      // A rejected request (400, 401, 403) fails the same way until the user
      // changes the filters or the token, so only other failures retry.
      if (source === state.source && !(status >= 400 && status < 500)) {
        scheduleReconnect();
      }
    });
  };
}

function disconnect() {
  if (state.source) {
    state.source.close();
    state.source = null;
  }
}

function scheduleReconnect() {
  clearTimeout(state.reconnectTimer);
  const delay = state.reconnectDelay * (0.5 + Math.random() / 2);
  state.reconnectDelay = Math.min(state.reconnectDelay * 2, RECONNECT_MAX_MS);
  state.reconnectTimer = setTimeout(() => {
    if (!state.paused) {
      connect(state.lastId);
    }
  }, delay);
}

// EventSource hides the body of an error response, so fetch it again to show
// the server's message (401, 403 or 400, as JSON). Returns the HTTP status,
// or 0 when the server is unreachable.
async function explainFailure(url) {
  const controller = new AbortController();
  try {
    const response = await fetch(url, {
      signal: controller.signal,
      headers: { Accept: "application/json" },
    });
    if (response.ok) {
      setMessage("stream closed; reconnecting");
    } else {
      const body = await response.json();
      setMessage(`${response.status}: ${body.message}`);
    }
    return response.status;
  } catch (error) {
    setMessage("server unreachable; reconnecting");
    return 0;
  } finally {
    controller.abort();
  }
}

function receive(event) {
  let data;
  try {
    data = parseExact(event.data);
  } catch (error) {
    setMessage("received an event that is not JSON");
    return;
  }
  if (event.lastEventId) {
    state.lastId = event.lastEventId;
    $("#last-id").textContent = event.lastEventId;
  }
  if (data.type === "heartbeat") {
    return;
  }
  if (data.type === "connection") {
    setMessage(`connected to slot ${data.slot}`);
    return;
  }

  state.buckets[state.buckets.length - 1] += 1;
  if (data.channel) {
    state.counts.set(data.channel, (state.counts.get(data.channel) || 0) + 1);
    renderCounters();
  }
  addRow(data, event.lastEventId);
}

function keyText(data) {
  const row = data.data;
  if (row === null || typeof row !== "object") {
    return "";
  }
  let keys = state.keyColumns.get(data.channel) || [];
  if (keys.length === 0 && "id" in row) {
    keys = ["id"];
  }
  return keys
    .filter((key) => key in row)
    .map((key) => `${key}=${formatJson(row[key])}`)
    .join(" ");
}

function cell(text, className) {
  const element = document.createElement("td");
  element.textContent = text;
  if (className) {
    element.className = className;
  }
  return element;
}

function addRow(data, eventId) {
  const row = document.createElement("tr");
  row.dataset.id = eventId || "";
  row.dataset.channel = data.channel || "";
  const isChange = data.type === "database_change";
  if (!isChange) {
    row.className = "notice";
  }

  const time = data.timestamp ? data.timestamp.replace("T", " ").replace("Z", "") : "";
  row.append(cell(time));
  row.append(cell(data.channel || data.type));
  const operation = cell(isChange ? data.operation : data.type, "operation");
  operation.dataset.operation = isChange ? data.operation : "";
  row.append(operation);
  row.append(cell(isChange ? keyText(data) : data.message || "", "key"));

  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = isChange ? data.table : "details";
  const body = document.createElement("pre");
  body.textContent = formatJson(isChange ? data.data : data);
  details.append(summary, body);
  const rowCell = document.createElement("td");
  rowCell.append(details);
  row.append(rowCell);

  const tbody = $("#events tbody");
  tbody.prepend(row);
  while (tbody.rows.length > MAX_ROWS) {
    tbody.deleteRow(-1);
  }
}

function renderCounters() {
  const tbody = $("#counters tbody");
  const rows = Array.from(state.counts.entries()).sort((a, b) => a[0].localeCompare(b[0]));
  tbody.replaceChildren(
    ...rows.map(([channel, count]) => {
      const row = document.createElement("tr");
      row.dataset.channel = channel;
      row.append(cell(channel), cell(String(count), "count"));
      return row;
    }),
  );
}

function drawChart() {
  const canvas = $("#chart");
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  const styles = getComputedStyle(document.documentElement);
  context.clearRect(0, 0, width, height);

  const peak = Math.max(1, ...state.buckets);
  const barWidth = width / CHART_SECONDS;
  context.fillStyle = styles.getPropertyValue("--accent").trim() || "#2f6fde";
  state.buckets.forEach((count, index) => {
    const barHeight = (count / peak) * (height - 14);
    context.fillRect(index * barWidth + 1, height - barHeight, barWidth - 2, barHeight);
  });
  context.fillStyle = styles.getPropertyValue("--muted").trim() || "#6b7385";
  context.font = "11px sans-serif";
  context.fillText(`peak ${peak}/s`, 4, 11);
}

function tick() {
  const finished = state.buckets[state.buckets.length - 1];
  $("#rate").textContent = `${finished} events/s`;
  state.buckets.shift();
  state.buckets.push(0);
  drawChart();
}

function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function loadChannels() {
  try {
    const response = await fetch("/api/channels", { headers: authHeaders() });
    if (!response.ok) {
      const body = await response.json();
      setMessage(`${response.status}: ${body.message}`);
      return;
    }
    const body = await response.json();
    renderChannelChoices(body.channels);
  } catch (error) {
    setMessage("cannot list channels; all channels are shown");
  }
}

function renderChannelChoices(channels) {
  const list = $("#channel-list");
  const names = [...new Set(channels.map((entry) => entry.channel))].sort();
  for (const entry of channels) {
    state.keyColumns.set(entry.channel, entry.key_columns);
  }
  list.replaceChildren(
    ...names.map((name) => {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "checkbox";
      input.value = name;
      label.append(input, " " + name);
      return label;
    }),
  );
}

function clearEvents() {
  $("#events tbody").replaceChildren();
  state.counts.clear();
  renderCounters();
}

function bindControls() {
  $("#filters").addEventListener("submit", (event) => {
    event.preventDefault();
    state.paused = false;
    $("#pause").textContent = "Pause";
    connect(state.lastId);
  });
  $("#replay").addEventListener("submit", (event) => {
    event.preventDefault();
    const from = $("#replay-from").value.trim();
    if (!from) {
      return;
    }
    clearEvents();
    state.paused = false;
    $("#pause").textContent = "Pause";
    connect(from);
  });
  $("#pause").addEventListener("click", () => {
    state.paused = !state.paused;
    if (state.paused) {
      // The journal keeps what arrives meanwhile; resuming reads from it.
      disconnect();
      clearTimeout(state.reconnectTimer);
      setState("paused");
      $("#pause").textContent = "Resume";
    } else {
      $("#pause").textContent = "Pause";
      connect(state.lastId);
    }
  });
  $("#clear").addEventListener("click", clearEvents);
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("#token").value.trim();
    $("#token").value = "";
    if (token) {
      sessionStorage.setItem(TOKEN_KEY, token);
    } else {
      sessionStorage.removeItem(TOKEN_KEY);
    }
    state.token = token || null;
    loadChannels();
    connect(state.lastId);
  });
}

function start() {
  loadToken();
  bindControls();
  drawChart();
  setInterval(tick, 1000);
  loadChannels();
  connect(null);
}

start();
