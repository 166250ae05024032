// edgelb status page: updates the server-rendered page in place from /status.json.
// Served by edgelb itself (/status.js); loads nothing else. Every value is written with
// textContent or as SVG coordinates, never as HTML: names come from outside (Ingresses, labels).
"use strict";
(function () {
  var body = document.body;
  var refresh = (parseFloat(body.dataset.refresh) || 2) * 1000;
  var points = parseInt(body.dataset.points, 10) || 150;
  var W = 240, H = 48; // the charts' viewBox, as edgelb/ops/history.py draws them
  var history = {}; // service name -> {t: [], requests: [], errors: [], latency: []}
  var live = document.getElementById("live");

  function fmtRate(x) {
    if (x >= 1000) return Math.round(x).toLocaleString("en") + "/s";
    return Number(x.toPrecision(3)).toString() + "/s";
  }
  function fmtSeconds(s) {
    if (s === null || s === undefined || s === 0) return "-";
    return s < 1 ? (s * 1000).toFixed(1) + " ms" : s.toFixed(2) + " s";
  }
  function fmtUptime(s) {
    s = Math.floor(s);
    var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600);
    var m = Math.floor(s % 3600 / 60), r = s % 60;
    if (d) return d + "d " + h + "h " + m + "m";
    if (h) return h + "h " + m + "m " + r + "s";
    return m + "m " + r + "s";
  }
  function fmtAge(s) {
    if (s === null || s === undefined) return "-";
    return s < 120 ? s.toFixed(0) + " s ago" : fmtUptime(s) + " ago";
  }
  function top(values) {
    var t = 0;
    values.forEach(function (v) { if (v !== null && v > t) t = v; });
    return t > 0 ? t : 1;
  }
  function polyline(values, scale) {
    if (!values.length) return "";
    var step = W / Math.max(1, points - 1), x0 = W - step * (values.length - 1);
    return values.map(function (v, i) {
      var y = H - (v || 0) / scale * (H - 2) - 1;
      return (x0 + i * step).toFixed(1) + "," + y.toFixed(1);
    }).join(" ");
  }
  function field(el, name) { return el.querySelector('[data-field="' + name + '"]'); }
  function set(el, name, text) {
    var f = field(el, name);
    if (f && f.textContent !== text) f.textContent = text;
  }
  function byData(selector, key) { // elements by a data attribute's value, compared as text
    var out = {};
    document.querySelectorAll(selector).forEach(function (el) { out[el.dataset[key]] = el; });
    return out;
  }
  function badge(el, cls, text) {
    var span = document.createElement("span");
    span.className = "badge " + cls;
    span.textContent = text;
    el.replaceChildren(span);
  }
  function classes(responses) {
    var out = {"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0};
    Object.keys(responses).forEach(function (code) {
      var c = code.charAt(0) + "xx";
      out[c] = (out[c] || 0) + responses[code];
    });
    return out;
  }

  function remember(svc) {
    var h = history[svc.name];
    if (svc.history) { // the first load: the server's points over the window
      h = history[svc.name] = {t: svc.history.t.slice(), requests: svc.history.requests.slice(),
                               errors: svc.history.errors.slice(),
                               latency: svc.history.latency.slice()};
    } else if (h && svc.rate.t !== null && svc.rate.t !== h.t[h.t.length - 1]) {
      h.t.push(svc.rate.t); h.requests.push(svc.rate.requests);
      h.errors.push(svc.rate.errors); h.latency.push(svc.rate.latency);
      ["t", "requests", "errors", "latency"].forEach(function (k) {
        if (h[k].length > points) h[k].splice(0, h[k].length - points);
      });
    }
    return h;
  }

  function drawService(section, svc) {
    var h = remember(svc);
    set(section, "rate", fmtRate(svc.rate.requests));
    set(section, "errors", fmtRate(svc.rate.errors));
    set(section, "latency", fmtSeconds(svc.rate.latency));
    set(section, "requests", String(svc.requests));
    var cls = classes(svc.responses);
    ["2xx", "3xx", "4xx", "5xx"].forEach(function (c) { set(section, c, String(cls[c])); });
    set(section, "inflight", String(svc.inflight));
    if (h) {
      var rateTop = top(h.requests);
      section.querySelector('[data-chart="requests"]').setAttribute("points", polyline(h.requests, rateTop));
      section.querySelector('[data-chart="errors"]').setAttribute("points", polyline(h.errors, rateTop));
      section.querySelector('[data-chart="latency"]').setAttribute("points", polyline(h.latency, top(h.latency)));
      set(section, "requests-top", fmtRate(rateTop));
      set(section, "latency-top", fmtSeconds(top(h.latency)));
    }
    var rows = {};
    section.querySelectorAll("tr[data-backend]").forEach(function (r) { rows[r.dataset.backend] = r; });
    svc.backends.forEach(function (b) {
      var row = rows[b.key];
      if (!row) return;
      set(row, "inflight", String(b.inflight));
      set(row, "latency", fmtSeconds(b.latency));
      set(row, "requests", String(b.requests));
      set(row, "failures", String(b.failures));
      var state = field(row, "state");
      if (b.draining) badge(state, "warn", "draining");
      else if (!b.healthy) badge(state, "bad", "down");
      else if (!b.eligible) badge(state, "warn", "off");
      else badge(state, "ok", "up");
    });
  }

  function draw(doc) {
    var sections = byData("section.service", "service");
    var names = doc.services.map(function (s) { return s.name; });
    if (names.length !== Object.keys(sections).length ||
        names.some(function (n) { return !(n in sections); })) {
      window.location.reload(); // services came or went: the server renders the new set
      return;
    }
    var total = 0, errors = 0;
    doc.services.forEach(function (svc) {
      total += svc.rate.requests; errors += svc.rate.errors;
      drawService(sections[svc.name], svc);
    });
    document.getElementById("total-rate").textContent = fmtRate(total);
    document.getElementById("total-errors").textContent = fmtRate(errors);
    document.getElementById("uptime").textContent = fmtUptime(doc.uptime);
    var readiness = document.getElementById("readiness");
    if (doc.draining) badge(readiness, "warn", "draining");
    else if (doc.ready) badge(readiness, "ok", "ready");
    else {
      badge(readiness, "bad", "not ready");
      var why = document.createElement("span");
      why.className = "err";
      why.textContent = " " + doc.not_ready.join("; ");
      readiness.appendChild(why);
    }
    var watchers = byData("tr[data-watcher]", "watcher");
    doc.watchers.forEach(function (w) {
      var row = watchers[w.name];
      if (!row) return;
      set(row, "age", fmtAge(w.last_event_age));
      set(row, "ok", String(w.reloads.ok));
      set(row, "error", String(w.reloads.error));
      set(row, "last_error", w.last_error || "");
      var state = field(row, "state");
      if (!w.up) badge(state, "bad", "down");
      else if (!w.synced) badge(state, "warn", "syncing");
      else badge(state, "ok", "synced");
    });
    document.querySelectorAll("tr[data-expires]").forEach(function (row) {
      var days = (parseFloat(row.dataset.expires) * 1000 - Date.now()) / 86400000;
      if (days > 0) set(row, "days", days.toFixed(1));
    });
  }

  var first = true;
  function poll() {
    fetch(first ? "/status.json?history=1" : "/status.json", {cache: "no-store"})
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (doc) {
        first = false;
        draw(doc);
        live.textContent = "live, updated " + new Date().toLocaleTimeString();
      })
      .catch(function (e) { live.textContent = "not updating: " + e.message; })
      .finally(function () { window.setTimeout(poll, refresh); });
  }
  live.textContent = "live";
  poll();
})();
