"""The dashboard page itself: HTML, CSS and a little vanilla JavaScript, as one string template.

Offers:
    PAGE    string.Template with $nonce (the CSP nonce of the inline style and script),
            $version and $auth ("form": ask for the key; "header": a proxy sends it)

Kept in a .py file so that it ships with the package without package-data configuration.
A queued job shows its estimated start, a running one its note ("loading smollm2"), as the REST
status gives them. Every value from the server is put on the page with ``textContent`` / text
nodes (``el`` below), never ``innerHTML``: job output and error messages are shown, not
interpreted. The script uses no ``$`` so that string.Template leaves it alone.
"""

from __future__ import annotations

from string import Template

__all__ = ["PAGE"]

PAGE = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>glassbox dashboard</title>
<style nonce="$nonce">
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f5f6f8; }
  header { display: flex; gap: 1em; align-items: center; padding: .6em 1.2em; background: #1d2330;
           color: #fff; }
  header h1 { font-size: 1.1em; margin: 0; }
  header .grow { flex: 1; }
  header button { font: inherit; }
  main { padding: .5em 1.2em 2em; }
  section { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: .4em .9em .8em;
            margin: .8em 0; }
  h2 { font-size: 1em; margin: .4em 0; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: .2em .6em; border-bottom: 1px solid #eceef2; vertical-align: top; }
  th { font-weight: 600; color: #5a6172; }
  td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
  tr.selected { background: #e8f0fe; }
  tbody tr[data-job-id] { cursor: pointer; }
  .empty { color: #8a90a0; font-style: italic; }
  .status { font-weight: 600; }
  .status-COMPLETED { color: #1a7f37; } .status-ERROR { color: #c62828; }
  .status-RUNNING { color: #1565c0; } .status-QUEUED { color: #8a6d00; } .status-CANCELLED { color: #666; }
  pre#logs { background: #11151c; color: #e6e6e6; padding: .6em; max-height: 24em; overflow: auto;
             white-space: pre-wrap; word-break: break-all; margin: .3em 0; }
  pre#logs:empty::before { content: "(nothing printed)"; color: #8a90a0; }
  .error { color: #c62828; }
  #key-form { max-width: 32em; }
  #key-form input { width: 100%; font: inherit; padding: .3em; box-sizing: border-box; }
  .badge { border-radius: 3px; padding: 0 .4em; background: #3d4a63; }
  .badge.operator { background: #b35c00; }
  dl { display: grid; grid-template-columns: max-content auto; gap: .1em 1em; margin: .3em 0; }
  dd { margin: 0; font-variant-numeric: tabular-nums; }
  [hidden] { display: none !important; }
</style>
</head>
<body data-auth="$auth">
<header>
  <h1>glassbox</h1><span>v$version</span><span class="grow"></span>
  <span id="who"></span><span id="updated"></span>
  <button id="forget" type="button" hidden>Forget key</button>
</header>
<main>
  <section id="key-form" hidden>
    <h2>API key</h2>
    <form id="key-entry">
      <p>Enter your glassbox API key. It is kept in this tab only (sessionStorage) and sent as the
         <code>X-API-Key</code> header.</p>
      <input id="key-input" type="password" autocomplete="off" placeholder="gbx_...">
      <p><button id="key-submit" type="submit">Open dashboard</button>
         <span id="key-error" class="error"></span></p>
    </form>
  </section>
  <div id="operator"></div>
  <section id="mine" hidden>
    <h2>Your jobs</h2>
    <div id="my-jobs"></div>
  </section>
  <section id="log-panel" hidden>
    <h2 id="log-title">Output</h2>
    <div id="log-error" class="error"></div>
    <pre id="logs"></pre>
  </section>
</main>
<script nonce="$nonce">
"use strict";
(function () {
  var STORE = "glassbox.apiKey";
  var MAX_LOG = 200000;
  var fromHeader = document.body.getAttribute("data-auth") === "header";
  var selected = null, logJob = null, logOffset = 0, logDone = false, busy = false;
  var FINAL = $final;

  function el(tag, attrs) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (name) {
      if (name === "text") { node.textContent = attrs[name]; } else { node.setAttribute(name, attrs[name]); }
    });
    for (var i = 2; i < arguments.length; i++) { node.append(arguments[i]); }  // strings: text nodes
    return node;
  }
  function byId(id) { return document.getElementById(id); }
  function num(n) { return n === null || n === undefined ? "-" : Number(n).toLocaleString("en-US"); }
  function bytes(n) {
    if (n === null || n === undefined) { return "-"; }
    var units = ["B", "KB", "MB", "GB", "TB"], value = n, i = 0;
    while (value >= 1024 && i < units.length - 1) { value /= 1024; i++; }
    return (i ? value.toFixed(1) : String(value)) + " " + units[i];
  }
  function exact(n) { return n === null || n === undefined ? "" : num(n) + " bytes"; }
  function seconds(s) {
    if (s === null || s === undefined) { return "-"; }
    if (s < 60) { return s.toFixed(1) + " s"; }
    if (s < 3600) { return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s"; }
    return (s / 3600).toFixed(1) + " h";
  }
  // a queued job's estimated start (server/api/queue_wait.py): "-" until its model has history
  function startsIn(j) {
    var s = j.estimated_start_seconds;
    return s === null || s === undefined ? "-" : "~" + seconds(s);
  }
  var ESTIMATE = "estimated from the run times of recently finished jobs";
  function note(j) { return j.note || ""; }
  var startCol = ["estimated_start_seconds", "Starts in", startsIn,
                  {num: 1, title: function () { return ESTIMATE; }}];
  function clock(t) { return t ? new Date(t * 1000).toLocaleTimeString() : "-"; }
  function ago(t, now) { return t ? seconds(Math.max(0, now - t)) + " ago" : "-"; }
  function key() { return sessionStorage.getItem(STORE); }
  function headers() { return fromHeader || !key() ? {} : {"X-API-Key": key()}; }

  // columns: [name, label, format(row) -> text, options {num, title(row)}]
  function table(rows, columns, options) {
    options = options || {};
    if (!rows.length) { return el("p", {"class": "empty", text: options.empty || "none"}); }
    var head = el("tr");
    columns.forEach(function (c) {
      head.append(el("th", {"class": c[3] && c[3].num ? "num" : "", text: c[1]}));
    });
    var body = el("tbody");
    rows.forEach(function (row) {
      var tr = el("tr");
      if (options.jobs) {
        tr.setAttribute("data-job-id", row.id);
        if (row.id === selected) { tr.className = "selected"; }
        tr.addEventListener("click", function () { select(row.id); });
      }
      columns.forEach(function (c) {
        var o = c[3] || {}, td = el("td", {"data-col": c[0], text: c[2](row)});
        if (o.num) { td.className = "num"; }
        if (o.title) { td.title = o.title(row); }
        if (c[0] === "status") {
          td.className = "status status-" + String(row.status).replace(/[^A-Z]/g, "");
        }
        tr.append(td);
      });
      body.append(tr);
    });
    return el("table", {"id": options.id || ""}, el("thead", {}, head), body);
  }
  function field(name) {
    return function (row) { var v = row[name]; return v === null || v === undefined ? "-" : String(v); };
  }
  function section(id, title, content) { return el("section", {"id": id}, el("h2", {text: title}), content); }
  function put(container, node) { container.replaceChildren(node); }

  function renderOperator(op, now) {
    var t = op.totals, b = op.batching;
    var modelCols = [["name", "Model", field("name")]];
    var has = function (k) { return op.models.some(function (m) { return m[k] !== undefined; }); };
    if (has("state")) { modelCols.push(["state", "State", field("state")]); }
    modelCols.push(["status", "Worker", field("status")]);
    if (has("class")) { modelCols.push(["class", "Class", field("class")]); }
    var count = function (k) { return function (m) { return num(m[k]); }; };
    if (has("replicas")) { modelCols.push(["replicas", "Replicas", count("replicas"), {num: 1}]); }
    if (has("parameters")) { modelCols.push(["parameters", "Parameters", count("parameters"), {num: 1}]); }
    if (has("bytes")) {
      modelCols.push(["bytes", "Memory", function (m) { return bytes(m.bytes); },
                      {num: 1, title: function (m) { return exact(m.bytes); }}]);
    }
    if (has("last_used")) {
      modelCols.push(["last_used", "Last used", function (m) { return ago(m.last_used, now); }]);
    }
    var totals = el("dl", {"id": "totals"});
    [["Worker", t.worker], ["Backend", t.backend], ["Queued", num(t.queued)], ["Running", num(t.running)],
     ["Keys", num(t.keys)]].forEach(function (p) {
      totals.append(el("dt", {text: p[0]}), el("dd", {"data-total": p[0].toLowerCase(), text: p[1]}));
    });
    var batching = el("dl", {"id": "batching"});
    [["max_batch", "Max batch", num(b.max_batch)], ["batch_scope", "Scope", b.batch_scope],
     ["batches", "Batches run", num(b.batches)], ["batched_jobs", "Jobs in batches", num(b.batched_jobs)],
     ["mean_batch", "Mean batch size", b.mean_batch === null ? "-" : String(b.mean_batch)]
    ].forEach(function (p) {
      batching.append(el("dt", {text: p[1]}), el("dd", {"data-stat": p[0], text: p[2]}));
    });
    var owner = ["owner", "Owner", field("owner")], model = ["model", "Model", field("model")];
    var id = ["id", "Job", field("id")];
    return el("div", {},
      section("server", "Server", totals),
      section("models", "Models", table(op.models, modelCols, {id: "models-table"})),
      section("queue", "Queue (" + num(t.queued) + ")", table(op.queue, [
        ["position", "Position", field("position"), {num: 1}], id, model, owner,
        ["age", "Waiting", function (j) { return seconds(j.age); }, {num: 1}],
        startCol], {id: "queue-table", empty: "empty"})),
      section("running", "Running", table(op.running, [id, model, owner,
        ["duration", "Running for", function (j) { return seconds(j.duration); }, {num: 1}],
        ["attempts", "Attempt", field("attempts"), {num: 1}], ["note", "Note", note]],
        {id: "running-table"})),
      section("recent", "Recently finished", table(op.recent, [
        id, model, owner, ["status", "Status", field("status")],
        ["duration", "Took", function (j) { return seconds(j.duration); }, {num: 1}],
        ["finished", "Finished", function (j) { return clock(j.finished); }],
        ["error", "Error", function (j) { return j.error || ""; }]], {id: "recent-table"})),
      section("replicas", "Replicas", table(op.replicas, [["label", "Replica", field("label")],
        ["models", "Models", function (r) { return (r.models || []).join(", "); }],
        ["state", "State", field("state")],
        ["pid", "PID", field("pid"), {num: 1}], ["running", "Running", field("running"), {num: 1}],
        ["restarts", "Restarts", field("restarts"), {num: 1}],
        ["batches", "Batches", field("batches"), {num: 1}],
        ["batched_jobs", "Batched jobs", field("batched_jobs"), {num: 1}]], {id: "replicas-table"})),
      section("batching-stats", "Batching", batching));
  }

  function render(data) {
    var who = byId("who");
    who.replaceChildren(el("span", {"class": "badge " + (data.role === "operator" ? "operator" : "")},
                           data.role), " " + data.key.name);
    byId("updated").textContent = "updated " + clock(data.now);
    byId("mine").hidden = false;
    put(byId("my-jobs"), table(data.jobs, [
      ["id", "Job", field("id")], ["model", "Model", field("model")], ["status", "Status", field("status")],
      ["position", "Queue position", field("position"), {num: 1}],
      startCol, ["note", "Note", note],
      ["age", "Submitted", function (j) { return seconds(j.age) + " ago"; }, {num: 1}],
      ["duration", "Run time", function (j) { return seconds(j.duration); }, {num: 1}],
      ["log_length", "Output", function (j) { return num(j.log_length) + " chars"; }, {num: 1}],
      ["result_bytes", "Result", function (j) { return bytes(j.result_bytes); },
       {num: 1, title: function (j) { return exact(j.result_bytes); }}],
      ["error", "Error", function (j) { return j.error || ""; }]],
      {id: "jobs-table", jobs: true, empty: "no jobs yet"}));
    var operator = byId("operator");
    if (data.operator) {
      put(operator, renderOperator(data.operator, data.now));
    } else {
      operator.replaceChildren();
    }
    if (selected === null && data.jobs.length) { selected = data.jobs[0].id; }
    var current = data.jobs.filter(function (j) { return j.id === selected; })[0];
    byId("log-panel").hidden = !current;
    if (current) {
      byId("log-title").textContent = "Output of job " + current.id + " (" + current.status + ")";
      byId("log-error").textContent = current.error || "";
    }
  }

  function select(id) { selected = id; tick(); }

  function showForm(message) {
    byId("key-form").hidden = false; byId("forget").hidden = true;
    ["mine", "log-panel"].forEach(function (id) { byId(id).hidden = true; });
    byId("operator").replaceChildren(); byId("who").textContent = ""; byId("updated").textContent = "";
    byId("key-error").textContent = message || "";
  }

  function followLogs() {
    if (!selected) { return Promise.resolve(); }
    if (logJob !== selected) {
      logJob = selected; logOffset = 0; logDone = false; byId("logs").textContent = "";
    }
    if (logDone) { return Promise.resolve(); }  // a finished job's output is all on the page already
    var job = selected;
    return fetch("/v1/jobs/" + encodeURIComponent(job) + "?log_offset=" + logOffset,
                 {headers: headers(), cache: "no-store"})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (state) {
        if (!state || job !== logJob) { return; }
        var pre = byId("logs");
        if (state.log_length < logOffset) { pre.textContent = ""; logOffset = 0; return; }  // a rerun
        if (state.logs) {
          var text = pre.textContent + state.logs;
          pre.textContent = text.length > MAX_LOG ? text.slice(text.length - MAX_LOG) : text;
          pre.scrollTop = pre.scrollHeight;
        }
        logOffset = state.log_length;
        logDone = FINAL.indexOf(state.status) >= 0;
      });
  }

  function tick() {
    if (busy) { return; }
    if (!fromHeader && !key()) { showForm(""); return; }
    busy = true;
    fetch("/v1/dashboard", {headers: headers(), cache: "no-store"}).then(function (r) {
      if (r.status === 401) {
        if (!fromHeader) { sessionStorage.removeItem(STORE); }
        showForm("That key was rejected by the server.");
        return null;
      }
      if (!r.ok) { throw new Error("the server answered " + r.status); }
      return r.json();
    }).then(function (data) {
      if (!data) { return; }
      byId("key-form").hidden = true; byId("forget").hidden = fromHeader;
      render(data);
      return followLogs();
    }).catch(function (err) {
      byId("updated").textContent = "not updated: " + err.message;
    }).then(function () { busy = false; });
  }

  byId("key-entry").addEventListener("submit", function (event) {
    event.preventDefault();
    var value = byId("key-input").value.trim();
    byId("key-input").value = "";
    if (value) { sessionStorage.setItem(STORE, value); selected = null; tick(); }
  });
  byId("forget").addEventListener("click", function () {
    sessionStorage.removeItem(STORE); selected = null; logJob = null; showForm("");
  });
  tick();
  setInterval(tick, 1000);
})();
</script>
</body>
</html>
""")
