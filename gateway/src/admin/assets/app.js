// The gateway dashboard: polls /dashboard/state every two seconds and renders it. Every value
// goes into the page as text (never as HTML). With `admin.token` set, open the page as
// /dashboard#token=TOKEN: the fragment never leaves the browser, and the token is kept for the
// tab only (sessionStorage).
"use strict";

const POLL_MS = 2000;

// The page's own record of its errors (read by the tests where the browser's log is not).
window.__dashboardErrors = [];
window.addEventListener("error", (e) => window.__dashboardErrors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => window.__dashboardErrors.push(String(e.reason)));
const sorts = {};
let state = null;

function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    history.replaceState(null, "", location.pathname);
    try {
      sessionStorage.setItem("gateway-admin-token", decodeURIComponent(m[1]));
    } catch (e) {
      problem("The token in the address is not valid: " + e.message);
    }
  }
  return sessionStorage.getItem("gateway-admin-token");
}

function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value === null || value === undefined ? "" : String(value);
  if (cls) el.className = cls;
  return el;
}

function when(unix) {
  if (!unix) return "–";
  return new Date(unix * 1000).toLocaleString();
}

function describeMatch(m) {
  if (!m) return "every request";
  const parts = [];
  if (m.hosts) parts.push("hosts " + m.hosts.join(", "));
  if (m.path) parts.push("path " + m.path);
  if (m.path_prefix) parts.push("prefix " + m.path_prefix);
  if (m.path_regex) parts.push("regex " + m.path_regex);
  if (m.methods) parts.push(m.methods.join(" "));
  // Header and query values are not sent (they may be secrets): the names show.
  if (m.headers) parts.push("header " + m.headers.map((h) => h.name).join(", "));
  if (m.query) parts.push("query " + m.query.map((q) => q.name).join(", "));
  return parts.length ? parts.join("; ") : "every request";
}

// A state as a colour and, always beside it, its name.
function stateBadge(name) {
  const cls = name === "healthy" ? "state-ok" : name === "waiting" || name === "probing" ? "state-warn" : "state-bad";
  const el = text("span", name, "state " + cls);
  el.dataset.state = name;
  return el;
}

function routeRows(s) {
  return s.routes.map((r) => {
    const target = r.upstream || (r.split || []).map((x) => x.upstream + " ×" + x.weight).join(", ") || "(answers itself)";
    const st = r.stats || {};
    return {
      key: r.name,
      sort: {
        name: r.name, match: describeMatch(r.match), policies: r.policies.join(" "), target,
        rate: st.requests_per_second ?? -1, errors: st.error_rate ?? -1, p95: st.p95_ms ?? -1,
      },
      cells: [
        text("td", r.name), text("td", describeMatch(r.match), "wrap"), text("td", r.policies.join(", ") || "–", "wrap"),
        text("td", target),
        text("td", st.requests_per_second === undefined ? "–" : st.requests_per_second.toFixed(1), "num"),
        text("td", st.error_rate === undefined ? "–" : (st.error_rate * 100).toFixed(1) + " %", "num"),
        text("td", st.p95_ms === undefined || st.p95_ms === null ? "–" : (st.p95_beyond ? "> " : "≤ ") + st.p95_ms, "num"),
      ],
    };
  });
}

function replicaRows(s) {
  const rows = [];
  for (const [name, up] of Object.entries(s.upstreams)) {
    if (up.replicas.length === 0) {
      rows.push({ key: name, sort: { upstream: name, address: "", state: "none", reason: "", in_flight: 0, errors: 0 },
        cells: [text("td", name), text("td", "no replica", "muted"), (() => { const td = document.createElement("td"); td.append(stateBadge("none")); return td; })(),
          text("td", "no address found for the targets"), text("td", "0", "num"), text("td", up.errors_last_minute ?? "–", "num")] });
    }
    for (const r of up.replicas) {
      const badge = document.createElement("td");
      badge.append(stateBadge(r.state));
      rows.push({
        key: name + " " + r.address,
        sort: { upstream: name, address: r.address, state: r.state, reason: r.reason, in_flight: r.in_flight, errors: up.errors_last_minute ?? -1 },
        cells: [text("td", name), text("td", r.address), badge, text("td", r.reason || "–", "wrap"),
          text("td", r.in_flight, "num"), text("td", up.errors_last_minute ?? "–", "num")],
      });
    }
  }
  return rows;
}

function listenerRows(s) {
  const rows = [];
  for (const l of s.listeners) {
    const certs = l.certificates.length ? l.certificates : [null];
    for (const c of certs) {
      rows.push({
        key: l.name,
        sort: { listener: l.name, address: l.address, names: c ? c.names.join(" ") : "", issuer: c ? c.issuer : "", expires: c ? c.not_after : 0, source: c ? c.source : "" },
        cells: [text("td", l.name), text("td", l.address + (l.tls ? " (TLS)" : "")),
          text("td", c ? c.names.join(", ") : "–", "wrap"), text("td", c ? c.issuer : "–", "wrap"),
          text("td", c ? when(c.not_after) : "–"), text("td", c ? c.source : "–")],
      });
    }
  }
  return rows;
}

function render(id, rows) {
  const table = document.getElementById(id);
  const sort = sorts[id];
  if (sort) {
    rows.sort((a, b) => {
      const x = a.sort[sort.key], y = b.sort[sort.key];
      const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return sort.dir * c;
    });
  }
  const filter = document.getElementById("filter").value.trim().toLowerCase();
  const body = document.createElement("tbody");
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.dataset.key = r.key;
    tr.append(...r.cells);
    if (filter && !tr.textContent.toLowerCase().includes(filter)) tr.hidden = true;
    body.append(tr);
  }
  table.tBodies[0].replaceWith(body);
}

function show(s) {
  document.getElementById("generation").textContent = s.config_generation + " (" + s.config_hash + ")";
  document.getElementById("applied").textContent = when(s.applied_at);
  const result = document.getElementById("reload-result");
  result.textContent = s.reload.last_result +
    (s.reload.restart_required.length ? " (restart needed for " + s.reload.restart_required.join(", ") + ")" : "");
  result.className = s.reload.last_result === "rejected" ? "bad" : "";
  const rej = s.reload.last_rejected;
  const box = document.getElementById("rejected");
  box.hidden = !rej;
  if (rej) {
    document.getElementById("rejected-at").textContent = when(rej.at);
    document.getElementById("rejected-error").textContent = rej.error;
    document.getElementById("rejected-file").textContent = rej.file;
    document.getElementById("rejected-line").textContent = rej.line || "–";
    document.getElementById("rejected-column").textContent = rej.column || "–";
    document.getElementById("rejected-field").textContent = rej.field || "–";
  }
  render("routes", routeRows(s));
  render("replicas", replicaRows(s));
  render("listeners", listenerRows(s));
  document.getElementById("updated").textContent = new Date().toLocaleTimeString();
}

function problem(message) {
  const p = document.getElementById("problem");
  p.hidden = !message;
  p.textContent = message || "";
}

async function poll() {
  try {
    const headers = {};
    const t = token();
    if (t) headers.Authorization = "Bearer " + t;
    // A poll that hangs is given up, so polling goes on.
    const resp = await fetch("/dashboard/state", { headers, cache: "no-store", signal: AbortSignal.timeout(POLL_MS * 3) });
    if (resp.status === 401) {
      problem("This gateway's admin views need a token: open /dashboard#token=TOKEN.");
    } else if (!resp.ok) {
      problem("The gateway answered " + resp.status + ".");
    } else {
      state = await resp.json();
      problem(null);
      show(state);
    }
  } catch (e) {
    problem("The gateway does not answer (" + e.message + "); retrying.");
  }
  setTimeout(poll, POLL_MS);
}

function setUpSorting() {
  for (const table of document.querySelectorAll("table")) {
    for (const th of table.tHead.rows[0].cells) {
      th.addEventListener("click", () => {
        const prev = sorts[table.id];
        const dir = prev && prev.key === th.dataset.key ? -prev.dir : 1;
        sorts[table.id] = { key: th.dataset.key, dir };
        for (const other of table.tHead.rows[0].cells) other.removeAttribute("aria-sort");
        th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
        if (state) show(state);
      });
    }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setUpSorting();
  document.getElementById("filter").addEventListener("input", () => state && show(state));
  poll();
});
