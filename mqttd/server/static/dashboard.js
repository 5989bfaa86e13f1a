// mqttd dashboard: reads the operations API every 2 s while the tab is visible.
// Every value from the broker goes into the page through textContent (never as HTML).
"use strict";

(() => {
  const POLL_MS = 2000;
  const PAGE = 50;
  const PREVIEW_CHARS = 160;
  const TOKEN_KEY = "mqttd-api-token";
  const $ = (id) => document.getElementById(id);

  const state = {
    clientOffset: 0,
    clientTotal: 0,
    retainedOffset: 0,
    retainedTotal: 0,
    previous: null, // {time, received, sent}: the last poll's broker-wide counters
    clientSent: new Map(), // client id -> {time, sent}
    clientRows: new Map(), // client id -> <tr>
    retainedRows: new Map(), // topic -> <tr>
    timer: null,
    polling: false,
  };

  // -- the API -------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(status ? `${status}: ${message}` : message);
      this.status = status;
    }
  }

  async function api(path, method = "GET") {
    const headers = {};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    let response;
    try {
      response = await fetch(path, { method, headers, cache: "no-store" });
    } catch (error) {
      throw new ApiError(0, "the broker does not answer");
    }
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      body = null;
    }
    if (!response.ok) {
      throw new ApiError(response.status, (body && body.error) || response.statusText);
    }
    return body;
  }

  // -- formatting ----------------------------------------------------------------------

  const numberFormat = new Intl.NumberFormat("en-US");
  const count = (n) => (n === null || n === undefined ? "–" : numberFormat.format(n));

  function rate(n) {
    if (n === null || n === undefined) return "–";
    return n >= 100 ? numberFormat.format(Math.round(n)) : n.toFixed(1);
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let unit = 0;
    while (n >= 1024 && unit < units.length - 1) {
      n /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${n} B` : `${n.toFixed(1)} ${units[unit]}`;
  }

  function duration(seconds) {
    const d = Math.floor(seconds / 86400);
    const h = Math.floor((seconds % 86400) / 3600);
    const m = Math.floor((seconds % 3600) / 60);
    if (d) return `${d}d ${h}h ${m}m`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m`;
    return `${seconds}s`;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setText(id, text) {
    $(id).textContent = text;
  }

  // -- messages and status -------------------------------------------------------------

  function showMessage(text, kind) {
    const message = $("message");
    message.textContent = text;
    message.className = `message ${kind}`;
    message.hidden = false;
  }

  function setStatus(text, kind) {
    const status = $("status");
    status.textContent = text;
    status.className = `status ${kind}`;
  }

  // -- header and totals ---------------------------------------------------------------

  function renderSys(page) {
    const values = new Map(page.retained.map((m) => [m.topic, m.payload]));
    const version = values.get("$SYS/broker/version");
    const uptime = /^(\d+) seconds$/.exec(values.get("$SYS/broker/uptime") || "");
    setText("version", version || "version unknown ($SYS topics off)");
    setText("uptime", uptime ? `up ${duration(Number(uptime[1]))}` : "");
  }

  function renderStats(stats, now) {
    setText("t-connections", count(stats.connections));
    setText("t-sessions", count(stats.sessions));
    setText("t-subscriptions", count(stats.subscriptions));
    setText("t-retained", count(stats.retained));
    setText("t-queued", count(stats.queued));
    setText("t-inflight", count(stats.inflight));
    setText("t-dropped", count(stats.dropped + stats.dropped_qos0));
    setText("t-refused", count(stats.refused + stats.storage_refused + stats.rate_refused));
    setText("t-store-pending", count(stats.store_pending));
    setText("t-storage", stats.storage_ok ? "ok" : "no room");
    $("t-storage").className = stats.storage_ok ? "good" : "bad";
    $("t-dropped").className = stats.dropped + stats.dropped_qos0 ? "bad" : "";
    const previous = state.previous;
    let received = null;
    let sent = null;
    if (previous && stats.messages_received >= previous.received) {
      const seconds = (now - previous.time) / 1000;
      received = (stats.messages_received - previous.received) / seconds;
      sent = (stats.messages_sent - previous.sent) / seconds;
    }
    setText("t-in-rate", rate(received));
    setText("t-out-rate", rate(sent));
    state.previous = { time: now, received: stats.messages_received, sent: stats.messages_sent };
  }

  // -- clients -------------------------------------------------------------------------

  const CLIENT_CELLS = [
    "client_id", "state", "protocol", "address", "queued", "queued_bytes", "inflight",
    "sent", "dropped", "out_rate", "subscriptions", "actions",
  ];
  const NUMERIC = new Set([
    "queued", "queued_bytes", "inflight", "sent", "dropped", "out_rate", "subscriptions",
  ]);

  function clientRow(clientId) {
    const row = el("tr");
    row.dataset.clientId = clientId;
    for (const name of CLIENT_CELLS) {
      const cell = el("td", NUMERIC.has(name) ? `num ${name}` : name);
      row.append(cell);
    }
    const kick = el("button", "kick", "Kick");
    kick.type = "button";
    kick.title = "Disconnect this client (its persistent session stays)";
    kick.addEventListener("click", () => act("kick", clientId));
    const remove = el("button", "delete-session danger", "Delete session");
    remove.type = "button";
    remove.title = "Delete the session, its subscriptions and its queue";
    remove.addEventListener("click", () => act("session", clientId));
    row.querySelector(".actions").append(kick, remove);
    return row;
  }

  function clientQuery() {
    let pattern = $("client-filter").value.trim();
    if (pattern && !/[*?[]/.test(pattern)) pattern = `*${pattern}*`; // a plain word: contains
    const query = new URLSearchParams({ offset: state.clientOffset, limit: PAGE });
    if (pattern) query.set("id", pattern);
    if ($("client-connected").value) query.set("connected", $("client-connected").value);
    return `/api/v1/clients?${query}`;
  }

  function renderClients(page, now) {
    state.clientTotal = page.total;
    const body = $("clients").tBodies[0];
    const shown = new Set();
    for (const client of page.clients) {
      const id = client.client_id;
      shown.add(id);
      let row = state.clientRows.get(id);
      if (!row) {
        row = clientRow(id);
        state.clientRows.set(id, row);
      }
      const before = state.clientSent.get(id);
      const outRate = before && client.sent >= before.sent
        ? (client.sent - before.sent) / ((now - before.time) / 1000) : null;
      state.clientSent.set(id, { time: now, sent: client.sent });
      const cells = {
        client_id: id,
        state: client.connected ? "connected" : "disconnected",
        protocol: client.protocol || "–",
        address: client.address || "–",
        queued: count(client.queued),
        queued_bytes: bytes(client.queued_bytes),
        inflight: count(client.inflight),
        sent: count(client.sent),
        dropped: count(client.dropped + client.dropped_qos0),
        out_rate: rate(outRate),
        subscriptions: count(client.subscriptions),
      };
      for (const [name, text] of Object.entries(cells)) {
        row.querySelector(`.${name}`).textContent = text;
      }
      row.querySelector(".state").classList.toggle("off", !client.connected);
      row.querySelector(".dropped").classList.toggle("bad", client.dropped + client.dropped_qos0 > 0);
      row.querySelector(".kick").hidden = !client.connected;
      row.title = client.persistent ? "persistent session" : "clean session";
      body.append(row); // in page order
    }
    for (const [id, row] of state.clientRows) {
      if (!shown.has(id)) {
        row.remove();
        state.clientRows.delete(id);
        state.clientSent.delete(id);
      }
    }
    $("clients-empty").hidden = page.total > 0;
    pager("client", page);
  }

  function pager(name, page) {
    if (page.offset > 0 && page.offset >= page.total) { // the last page emptied: go back
      state[`${name}Offset`] = Math.max(0, Math.ceil(page.total / PAGE) - 1) * PAGE;
    }
    const last = Math.min(page.offset + page.limit, page.total);
    setText(`${name}-range`, page.total
      ? `${count(page.offset + 1)}–${count(last)} of ${count(page.total)}` : "");
    $(`${name}-prev`).disabled = page.offset === 0;
    $(`${name}-next`).disabled = last >= page.total;
  }

  // -- bridges -------------------------------------------------------------------------

  function renderBridges(page) {
    const body = $("bridges").tBodies[0];
    const rows = page.bridges.map((bridge) => {
      const row = el("tr");
      const stateCell = el("td", `state ${bridge.state === "connected" ? "" : "off"}`, bridge.state);
      row.append(
        el("td", "", bridge.name), el("td", "", bridge.remote || "–"), stateCell,
        el("td", "num", count(bridge.forwarded)), el("td", "num", count(bridge.received)),
        el("td", "num", count(bridge.queued)), el("td", "num", count(bridge.dropped)),
        el("td", "error-text", bridge.last_error || ""),
      );
      return row;
    });
    body.replaceChildren(...rows);
    $("bridges-empty").hidden = rows.length > 0;
  }

  // -- cluster (cluster mode only) -------------------------------------------------------

  function renderCluster(view) {
    $("cluster-section").hidden = view === null;
    if (view === null) return;
    setText("cluster-node", `this node: ${view.node}, ${view.nodes_up} of ${view.nodes_known} up`);
    const row = (name, up, label, counters, age) => {
      const tr = el("tr");
      tr.append(
        el("td", "", name), el("td", `state ${up ? "" : "off"}`, label),
        el("td", "num", count(counters.connections)),
        el("td", "num", count(counters.messages_received)),
        el("td", "num", count(counters.messages_sent)),
        el("td", "num", age === null ? "" : `${age.toFixed(1)} s`),
      );
      return tr;
    };
    const rows = view.nodes.map((node) => row(
      node.node, node.up, node.up ? "up" : `down (${node.state})`, node.counters,
      node.heartbeat_age_s,
    ));
    const total = row("total", true, "", view.totals, null);
    total.className = "total";
    $("cluster").tBodies[0].replaceChildren(...rows, total);
  }

  // -- retained messages ---------------------------------------------------------------

  function retainedQuery() {
    const filter = $("retained-filter").value.trim() || "#";
    const query = new URLSearchParams({ filter, offset: state.retainedOffset, limit: PAGE });
    return `/api/v1/retained?${query}`;
  }

  function retainedRow(topic) {
    const row = el("tr");
    row.dataset.topic = topic;
    row.append(el("td", "topic", topic), el("td", "num qos"), el("td", "num size"),
      el("td", "payload"), el("td", "actions"));
    const remove = el("button", "delete-retained danger", "Delete");
    remove.type = "button";
    remove.title = "Delete this retained message (no subscriber is told)";
    remove.addEventListener("click", () => act("retained", topic));
    row.querySelector(".actions").append(remove);
    return row;
  }

  function renderRetained(page) {
    state.retainedTotal = page.total;
    const body = $("retained").tBodies[0];
    const shown = new Set();
    for (const message of page.retained) {
      shown.add(message.topic);
      let row = state.retainedRows.get(message.topic);
      if (!row) {
        row = retainedRow(message.topic);
        state.retainedRows.set(message.topic, row);
      }
      const binary = message.payload === undefined;
      let preview = binary ? message.payload_base64 : message.payload;
      const cut = preview.length > PREVIEW_CHARS || message.truncated;
      preview = preview.slice(0, PREVIEW_CHARS) + (cut ? "…" : "");
      row.querySelector(".qos").textContent = message.qos;
      row.querySelector(".size").textContent = bytes(message.payload_bytes);
      const payload = row.querySelector(".payload");
      payload.textContent = binary ? `base64 ${preview}` : preview;
      payload.classList.toggle("binary", binary);
      body.append(row);
    }
    for (const [topic, row] of state.retainedRows) {
      if (!shown.has(topic)) {
        row.remove();
        state.retainedRows.delete(topic);
      }
    }
    $("retained-empty").hidden = page.total > 0;
    pager("retained", page);
  }

  // -- actions -------------------------------------------------------------------------

  const ACTIONS = {
    kick: {
      ask: (id) => `Disconnect client "${id}"? A persistent session stays, with its queue.`,
      path: (id) => `/api/v1/clients/${encodeURIComponent(id)}`,
      done: (id) => `Client "${id}" disconnected.`,
    },
    session: {
      ask: (id) => `Delete the session of "${id}" with its subscriptions and queued messages? `
        + "A connected client is disconnected.",
      path: (id) => `/api/v1/sessions/${encodeURIComponent(id)}`,
      done: (id) => `Session "${id}" deleted.`,
    },
    retained: {
      ask: (topic) => `Delete the retained message on "${topic}"?`,
      path: (topic) => `/api/v1/retained/${encodeURIComponent(topic)}`,
      done: (topic) => `Retained message on "${topic}" deleted.`,
    },
  };

  async function act(kind, name) {
    const action = ACTIONS[kind];
    if (!window.confirm(action.ask(name))) return;
    try {
      await api(action.path(name), "DELETE");
      showMessage(action.done(name), "ok");
    } catch (error) {
      const hint = error.status === 401 ? " (enter the API token above)" : "";
      showMessage(`Failed: ${error.message}${hint}`, "error");
    }
    refreshNow();
  }

  // -- polling -------------------------------------------------------------------------

  async function poll() {
    const now = performance.now();
    const sysQuery = `/api/v1/retained?${new URLSearchParams({ filter: "$SYS/broker/+" })}`;
    const [stats, sys, clients, bridges, retained] = await Promise.all([
      api("/api/v1/stats"), api(sysQuery), api(clientQuery()), api("/api/v1/bridges"),
      api(retainedQuery()),
    ]);
    // cluster mode only (the stats have cluster_* keys then): no 404 on a single node
    const cluster = "cluster_ready" in stats ? await api("/api/v1/cluster") : null;
    renderStats(stats, now);
    renderCluster(cluster);
    renderSys(sys);
    renderClients(clients, now);
    renderBridges(bridges);
    renderRetained(retained);
  }

  async function tick() {
    state.timer = null;
    if (document.hidden) {
      setStatus("paused (tab hidden)", "paused");
      return;
    }
    if (state.polling) return;
    state.polling = true;
    try {
      await poll();
      setStatus("live", "live");
      setText("updated", `last update ${new Date().toLocaleTimeString()}`);
    } catch (error) {
      const hint = error.status === 401 ? " (this listener needs the API token)" : "";
      setStatus(`error: ${error.message}${hint}`, "error");
    } finally {
      state.polling = false;
    }
    if (!document.hidden && state.timer === null) state.timer = setTimeout(tick, POLL_MS);
  }

  function refreshNow() {
    if (state.timer !== null) clearTimeout(state.timer);
    state.timer = null;
    if (state.polling) {
      state.timer = setTimeout(tick, 100); // after the poll under way
    } else {
      tick();
    }
  }

  // -- controls ------------------------------------------------------------------------

  function debounce(fn, ms) {
    let timer = null;
    return () => {
      clearTimeout(timer);
      timer = setTimeout(fn, ms);
    };
  }

  function setup() {
    const token = $("token");
    token.value = sessionStorage.getItem(TOKEN_KEY) || "";
    token.addEventListener("input", () => {
      if (token.value.trim()) {
        sessionStorage.setItem(TOKEN_KEY, token.value.trim());
      } else {
        sessionStorage.removeItem(TOKEN_KEY);
      }
    });
    for (const form of [$("client-form"), $("retained-form")]) {
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        refreshNow();
      });
    }
    const clientsChanged = debounce(() => {
      state.clientOffset = 0;
      refreshNow();
    }, 300);
    $("client-filter").addEventListener("input", clientsChanged);
    $("client-connected").addEventListener("change", clientsChanged);
    $("retained-filter").addEventListener("input", debounce(() => {
      state.retainedOffset = 0;
      refreshNow();
    }, 300));
    $("client-prev").addEventListener("click", () => {
      state.clientOffset = Math.max(0, state.clientOffset - PAGE);
      refreshNow();
    });
    $("client-next").addEventListener("click", () => {
      if (state.clientOffset + PAGE < state.clientTotal) state.clientOffset += PAGE;
      refreshNow();
    });
    $("retained-prev").addEventListener("click", () => {
      state.retainedOffset = Math.max(0, state.retainedOffset - PAGE);
      refreshNow();
    });
    $("retained-next").addEventListener("click", () => {
      if (state.retainedOffset + PAGE < state.retainedTotal) state.retainedOffset += PAGE;
      refreshNow();
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) refreshNow();
    });
    tick();
  }

  setup();
})();
