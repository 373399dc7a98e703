// fedtune console run page: poll the JSON API, draw what it says. No framework, no build, no network but ours.
// The token is never in this script: the browser's HttpOnly session cookie authorises every request it makes.
(function () {
  "use strict";
  const cfg = window.FEDTUNE;
  const api = "/api/runs/" + encodeURIComponent(cfg.run);
  const SVG = "http://www.w3.org/2000/svg";
  const PALETTE = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d", "#dc2626"];

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  const fmt = (v, d) => (v === null || v === undefined ? "-" : Number(v).toFixed(d === undefined ? 3 : d));
  const kib = (b) => (b >= 1048576 ? (b / 1048576).toFixed(2) + " MiB" : (b / 1024).toFixed(1) + " KiB");
  function ago(ts, now) {
    if (!ts) return "never";
    const s = Math.max(0, Math.round(now - ts));
    return s < 60 ? s + " s ago" : s < 3600 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
  }
  function colorFor(name, names) {
    return name === "weighted" ? "#111827" : PALETTE[names.indexOf(name) % PALETTE.length];
  }

  // A line chart over rounds on the y axis the server fitted to the data (`axis`: min, max, step, digits, label).
  // One polyline + one point per (series, round), values kept in data-* attributes; `opts.refs` adds labelled
  // horizontal lines (caps), `opts.style(name)` a class per series (e.g. dotted own-share epsilon).
  function lineChart(node, seriesMap, axis, opts) {
    node.replaceChildren();
    const W = 560, H = 260, L = 62, R = 118, T = 12, B = 30;
    const names = Object.keys(seriesMap).filter((k) => seriesMap[k].length);
    const points = names.flatMap((n) => seriesMap[n]);
    node.setAttribute("data-y-min", axis.min);
    node.setAttribute("data-y-max", axis.max);
    if (!points.length) {
      node.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no data yet"));
      return;
    }
    const xMax = Math.max(opts.xMax, 1);
    const x = (r) => L + (r / xMax) * (W - L - R);
    const y = (v) => T + (1 - (v - axis.min) / (axis.max - axis.min)) * (H - T - B);
    const ticks = Math.round((axis.max - axis.min) / axis.step);
    for (let i = 0; i <= ticks; i++) {
      const v = axis.min + i * axis.step;
      node.appendChild(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
      node.appendChild(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", class: "tick ytick" },
        v.toFixed(axis.digits)));
    }
    for (let r = 0; r <= xMax; r++) {
      node.appendChild(svg("text", { x: x(r), y: H - 10, "text-anchor": "middle", class: "tick" }, String(r)));
    }
    node.appendChild(svg("text", { x: (L + W - R) / 2, y: H, "text-anchor": "middle", class: "axis" }, "round"));
    node.appendChild(svg("text", {
      x: -(T + (H - T - B) / 2), y: 12, transform: "rotate(-90)", "text-anchor": "middle", class: "axis ylabel",
    }, axis.label));
    const siteNames = opts.sites || names.filter((n) => n !== "weighted");
    let row = 0;
    const legend = (label, color, cls) => {
      node.appendChild(svg("line", {
        x1: W - R + 10, x2: W - R + 24, y1: T + row * 18 + 2, y2: T + row * 18 + 2, stroke: color, class: cls,
      }));
      node.appendChild(svg("text", { x: W - R + 28, y: T + row * 18 + 6, class: "legend" }, label));
      row++;
    };
    for (const ref of opts.refs || []) {
      const color = colorFor(ref.site, siteNames);
      if (ref.value < axis.min || ref.value > axis.max) continue;
      node.appendChild(svg("line", {
        x1: L, x2: W - R, y1: y(ref.value), y2: y(ref.value), stroke: color, class: "ref",
        "data-ref": ref.site, "data-value": ref.value,
      }));
      legend(ref.label, color, "ref");
    }
    names.forEach((name) => {
      const color = colorFor(opts.siteOf ? opts.siteOf(name) : name, siteNames);
      const pts = seriesMap[name];
      const cls = "line " + (name === "weighted" ? "weighted" : (opts.style && opts.style(name)) || "");
      node.appendChild(svg("polyline", {
        points: pts.map((p) => x(p[0]) + "," + y(p[1])).join(" "), stroke: color, class: cls, "data-series": name,
      }));
      for (const [r, v] of pts) {
        const dot = svg("circle", {
          cx: x(r), cy: y(v), r: name === "weighted" ? 4 : 3, fill: color,
          "data-series": name, "data-round": r, "data-value": v,
        });
        dot.appendChild(svg("title", {}, name + " round " + r + ": " + fmt(v)));
        node.appendChild(dot);
      }
      legend(name, color, cls);
    });
  }

  // Bytes per round: up and down bars side by side.
  function bytesChart(node, rows, xMax) {
    node.replaceChildren();
    const W = 560, H = 260, L = 78, R = 110, T = 12, B = 30;
    if (!rows.length) {
      node.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no data yet"));
      return;
    }
    const top = Math.max(1, ...rows.map((r) => Math.max(r.up, r.down)));
    const slot = (W - L - R) / (Math.max(xMax, 1) + 1);
    const y = (v) => T + (1 - v / top) * (H - T - B);
    for (let i = 0; i <= 4; i++) {
      const v = (i / 4) * top;
      node.appendChild(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
      node.appendChild(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" }, kib(v)));
    }
    for (const r of rows) {
      const x0 = L + r.round * slot + slot * 0.15, w = slot * 0.35;
      for (const [kind, v, dx, color] of [["up", r.up, 0, "#2563eb"], ["down", r.down, w, "#d97706"]]) {
        const bar = svg("rect", {
          x: x0 + dx, y: y(v), width: w, height: Math.max(0, y(0) - y(v)), fill: color,
          "data-kind": kind, "data-round": r.round, "data-value": v,
        });
        bar.appendChild(svg("title", {}, kind + " round " + r.round + ": " + kib(v)));
        node.appendChild(bar);
      }
      node.appendChild(svg("text", { x: x0 + w, y: H - 10, "text-anchor": "middle", class: "tick" }, String(r.round)));
    }
    [["up (sites to server)", "#2563eb"], ["down (server to sites)", "#d97706"]].forEach(([label, color], i) => {
      node.appendChild(svg("rect", { x: W - R + 10, y: T + i * 18, width: 12, height: 8, fill: color }));
      node.appendChild(svg("text", { x: W - R + 26, y: T + i * 18 + 8, class: "legend" }, label.split(" ")[0]));
    });
  }

  function fillTable(id, rows) {
    const body = document.querySelector("#" + id + " tbody");
    body.replaceChildren(...rows);
  }

  // Epsilon after each round, per site, against each site's cap; own-share epsilon (distributed noise) dotted.
  function epsilonChart(d, xMax) {
    const sites = d.privacy.map((p) => p.site);
    const series = {};
    for (const [site, pts] of Object.entries(d.charts.epsilon)) series[site] = pts;
    for (const [site, pts] of Object.entries(d.charts.epsilon_worst)) series[site + " own share"] = pts;
    const siteOf = (name) => name.replace(/ own share$/, "");
    const refs = d.privacy.filter((p) => p.cap !== null)
      .map((p) => ({ site: p.site, value: p.cap, label: "cap " + p.site }));
    lineChart(document.getElementById("chart-epsilon"), series, d.axes.epsilon, {
      xMax: xMax, sites: sites, siteOf: siteOf, refs: refs,
      style: (name) => (name.endsWith(" own share") ? "worst" : ""),
    });
  }

  // One row per round, per site "epsilon / cap" and sigma (and the own-share epsilon when any site reported one).
  function epsilonRounds(d) {
    const sites = d.privacy.map((p) => p.site);
    const worst = d.privacy_rounds.some((p) => p.epsilon_worst !== null);
    const head1 = el("tr", {});
    const head2 = el("tr", {});
    head1.appendChild(el("th", { rowspan: 2 }, "round"));
    for (const site of sites) {
      head1.appendChild(el("th", { colspan: worst ? 4 : 3, class: "site-group" }, site));
      head2.appendChild(el("th", { class: "num" }, "epsilon / cap"));
      if (worst) head2.appendChild(el("th", { class: "num" }, "own share"));
      head2.appendChild(el("th", { class: "num" }, "sigma"));
      head2.appendChild(el("th", {}, "status"));
    }
    document.querySelector("#eps-rounds thead").replaceChildren(head1, head2);
    const byRound = new Map();
    for (const p of d.privacy_rounds) {
      if (!byRound.has(p.round)) byRound.set(p.round, new Map());
      byRound.get(p.round).set(p.site, p);
    }
    const rounds = [...byRound.keys()].sort((a, b) => a - b);
    fillTable("eps-rounds", rounds.map((r) => {
      const tr = el("tr", { "data-round": r });
      tr.appendChild(el("td", { class: "num" }, String(r)));
      for (const site of sites) {
        const p = byRound.get(r).get(site);
        const known = (v) => p && v !== null && v !== undefined;
        const cap = known(p && p.cap) ? " / " + fmt(p.cap, 2) : "";
        const epsText = known(p && p.epsilon) ? fmt(p.epsilon, 2) + cap : "-";
        tr.appendChild(el("td", {
          class: "num eps", "data-site": site, "data-value": known(p && p.epsilon) ? p.epsilon : "",
        }, epsText));
        if (worst) {
          tr.appendChild(el("td", { class: "num eps-worst", "data-site": site },
            known(p && p.epsilon_worst) ? fmt(p.epsilon_worst, 2) : "-"));
        }
        tr.appendChild(el("td", {
          class: "num sigma", "data-site": site, "data-value": known(p && p.sigma) ? p.sigma : "",
        }, known(p && p.sigma) ? fmt(p.sigma, 3) : "-"));
        tr.appendChild(el("td", { class: "site-status", "data-site": site }, p ? p.status : "-"));
      }
      return tr;
    }));
  }

  function render(d) {
    const run = d.run;
    const status = document.getElementById("run-status");
    status.textContent = run.status;
    status.className = "status " + run.status;
    const done = d.timeline.filter((r) => r.round > 0 && (r.status === "completed" || r.status === "failed")).length;
    document.getElementById("run-meta").textContent =
      run.name + " - " + done + "/" + run.rounds_total + " rounds - attempt " + run.attempts +
      (run.error ? " - " + run.error : "");

    const byRound = new Map(d.timeline.map((r) => [r.round, r]));
    const boxes = [];
    for (let r = 0; r <= run.rounds_total; r++) {
      const t = byRound.get(r) || { round: r, status: "pending" };
      const box = el("div", { class: "round " + t.status, "data-round": r, "data-status": t.status });
      box.appendChild(el("div", { class: "label" }, r === 0 ? "base" : "R" + r));
      box.appendChild(el("div", { class: "detail" }, t.wall_s ? t.wall_s.toFixed(1) + " s" : t.status));
      box.title = "round " + r + ": " + t.status + (t.attempt > 1 ? " (attempt " + t.attempt + ")" : "") +
        (t.accuracy !== undefined && t.accuracy !== null ? ", accuracy " + fmt(t.accuracy) : "") +
        (t.error ? ", " + t.error : "");
      boxes.push(box);
    }
    document.getElementById("timeline").replaceChildren(...boxes);

    const rounds = { xMax: run.rounds_total };
    lineChart(document.getElementById("chart-accuracy"), d.charts.accuracy, d.axes.accuracy, rounds);
    lineChart(document.getElementById("chart-loss"), d.charts.loss, d.axes.loss, rounds);
    bytesChart(document.getElementById("chart-bytes"), d.bytes, run.rounds_total);
    epsilonChart(d, run.rounds_total);
    epsilonRounds(d);

    // Distributed noise: each site's epsilon of its own noise share alone, beside the charged one (local: hidden).
    const known = (v) => v !== null && v !== undefined;
    const anyWorst = d.privacy.some((p) => known(p.epsilon_worst));
    document.querySelectorAll("#eps-table th.eps-worst, #eps-note").forEach((n) => { n.hidden = !anyWorst; });
    fillTable("eps-table", d.privacy.map((p) => {
      const tr = el("tr", { "data-site": p.site });
      tr.appendChild(el("td", {}, p.site));
      tr.appendChild(el("td", { class: "num eps", "data-value": p.epsilon === null ? "" : p.epsilon }, fmt(p.epsilon, 2)));
      const worst = { class: "num eps-worst", "data-value": known(p.epsilon_worst) ? p.epsilon_worst : "" };
      tr.appendChild(el("td", anyWorst ? worst : { ...worst, hidden: "" }, fmt(p.epsilon_worst, 2)));
      tr.appendChild(el("td", { class: "num cap", "data-value": p.cap === null ? "" : p.cap }, fmt(p.cap, 2)));
      const used = el("td", { class: "used" });
      const bar = el("div", { class: "bar" });
      const pct = p.fraction === null ? 0 : Math.min(100, p.fraction * 100);
      const fill = el("span", { class: pct > 90 ? "hot" : "" });
      fill.style.width = pct + "%"; // CSSOM, not a style attribute: the page's CSP allows no inline styles
      bar.appendChild(fill);
      used.append(bar, el("small", {}, p.fraction === null ? "-" : Math.round(p.fraction * 100) + "%"));
      tr.appendChild(used);
      tr.appendChild(el("td", { class: "num" }, String(p.trained)));
      tr.appendChild(el("td", { class: "num" }, String(p.declined)));
      return tr;
    }));

    fillTable("health-table", d.health.map((h) => {
      const tr = el("tr", { "data-site": h.site });
      tr.appendChild(el("td", {}, h.site));
      tr.appendChild(el("td", { class: "num" }, h.node_id === null ? "-" : String(h.node_id)));
      const st = el("td", {});
      st.appendChild(el("span", { class: "status " + h.status }, h.status));
      tr.appendChild(st);
      tr.appendChild(el("td", {}, ago(h.last_seen, d.now)));
      tr.appendChild(el("td", {}, h.declined.map((x) => "R" + x.round + ": " + x.reason).join("; ") || "none"));
      tr.appendChild(el("td", {}, h.failed.map((x) => "R" + x.round + ": " + x.reason).join("; ") || "none"));
      return tr;
    }));

    fillTable("checkpoint-table", d.checkpoints.slice().reverse().map((c) => {
      const tr = el("tr", { "data-round": c.round });
      const t = byRound.get(c.round) || {};
      tr.appendChild(el("td", { class: "num" }, c.round === 0 ? "0 (initial)" : String(c.round)));
      tr.appendChild(el("td", { class: "num" }, fmt(t.accuracy)));
      tr.appendChild(el("td", {}, c.sha256.slice(0, 16) + "..."));
      tr.appendChild(el("td", {}, new Date(c.created * 1000).toLocaleString()));
      const link = el("a", {
        href: api + "/checkpoints/" + c.round + "/adapter.zip",
        download: "fedtune-" + run.id + "-round-" + c.round + ".zip",
      }, "download zip");
      const td = el("td", {});
      td.appendChild(link);
      tr.appendChild(td);
      return tr;
    }));
    document.getElementById("updated").textContent = "updated " + new Date(d.now * 1000).toLocaleTimeString();
  }

  async function poll() {
    let running = true;
    try {
      const res = await fetch(api, { credentials: "same-origin", cache: "no-store" });
      if (res.status === 401) {
        const note = document.getElementById("updated");
        note.replaceChildren("session expired or signed out: ",
          el("a", { href: "/login?next=" + encodeURIComponent(location.pathname) }, "sign in again"),
          " (or reopen the URL printed by fedtune console)");
        return;
      }
      const data = await res.json();
      render(data);
      running = data.run.status === "running";
    } catch (err) {
      document.getElementById("updated").textContent = "console unreachable, retrying: " + err;
    }
    setTimeout(poll, running ? cfg.pollMs : cfg.pollMs * 5);
  }
  poll();
})();
