// eventbus admin page: the overview refreshes itself from /ui/api/overview and sorts its queue
// table. Plain DOM calls only (textContent, setAttribute): nothing received becomes markup.
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const SVG = "http://www.w3.org/2000/svg";
  const SERIES = ["published", "delivered", "acked"];
  const COUNTS = ["ready", "in_flight", "delayed", "dead_letters", "consumers"];
  const table = document.getElementById("queues");
  if (document.body.dataset.page !== "overview" || !table) return;

  let sort = table.dataset.sort;
  let order = table.dataset.order;
  let data = null;
  const grouped = new Intl.NumberFormat("en-US");

  function count(v) { return v === null || v === undefined ? "—" : grouped.format(Math.trunc(v)); }
  function rate(v) {
    if (v === null || v === undefined) return "—";
    if (v === 0) return "0/s";
    return v < 10 ? v.toFixed(1) + "/s" : grouped.format(Math.round(v)) + "/s";
  }
  function age(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    let s = Math.max(Math.trunc(seconds), 0);
    const d = Math.trunc(s / 86400); s -= d * 86400;
    const h = Math.trunc(s / 3600); s -= h * 3600;
    const m = Math.trunc(s / 60); s -= m * 60;
    const two = (n) => String(n).padStart(2, "0");
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + two(m) + "m";
    if (m) return m + "m " + two(s) + "s";
    return s + "s";
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function spark(paths) {
    if (!paths) return el("span", "muted", "not sampled");
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", "0 0 120 28");
    svg.setAttribute("width", "120");
    svg.setAttribute("height", "28");
    svg.setAttribute("role", "img");
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("aria-label", "rates over the last 15 minutes");
    for (const name of SERIES) {
      const path = document.createElementNS(SVG, "path");
      path.setAttribute("class", "s-" + name);
      path.setAttribute("d", paths[name] || "");
      svg.appendChild(path);
    }
    return svg;
  }

  function value(row, key) {
    if (SERIES.includes(key)) return row.rates[key];
    return row[key];
  }

  function sorted(rows) {
    const byName = rows.slice().sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    if (sort === "name") return order === "desc" ? byName.reverse() : byName;
    const sign = order === "desc" ? -1 : 1;
    return byName.sort((a, b) => {
      const x = value(a, sort), y = value(b, sort);
      if (x === null || x === undefined) return y === null || y === undefined ? 0 : 1;
      if (y === null || y === undefined) return -1;
      return (x - y) * sign;
    });
  }

  function queueRow(row) {
    const tr = el("tr");
    tr.dataset.name = row.name;
    const th = el("th");
    th.scope = "row";
    const a = el("a", "", row.name);
    a.href = row.url;
    th.appendChild(a);
    tr.appendChild(th);
    for (const key of COUNTS) {
      tr.appendChild(el("td", key === "dead_letters" && row[key] ? "num bad" : "num", count(row[key])));
    }
    for (const key of SERIES) tr.appendChild(el("td", "num", rate(row.rates[key])));
    const cell = el("td");
    cell.appendChild(spark(row.spark));
    tr.appendChild(cell);
    tr.appendChild(el("td", "num", age(row.oldest_unacked_seconds)));
    return tr;
  }

  function nodeCard(node) {
    const card = el("div", "card");
    const title = el("div", "card-title", node.name);
    if (node.this) title.append(" ", el("span", "badge", "this node"));
    card.appendChild(title);
    card.appendChild(el("div", "muted", "eventbus " + node.version + " · up " + age(node.uptime_seconds)));
    const chips = el("div", "chips");
    if (node.dependencies) {
      for (const [name, state] of Object.entries(node.dependencies)) {
        const chip = el("span", "chip " + state.split(":")[0], name);
        chip.title = state;
        chips.appendChild(chip);
      }
    } else {
      chips.appendChild(el("span", "muted", "peer (its dependencies: its own page)"));
    }
    card.appendChild(chips);
    return card;
  }

  function replace(id, children) {
    const box = document.getElementById(id);
    if (box) box.replaceChildren(...children);
  }

  function render() {
    if (!data) return;
    table.tBodies[0].replaceChildren(...sorted(data.queues).map(queueRow));
    document.getElementById("queue-count").textContent = String(data.queues.length);
    replace("nodes", data.nodes.map(nodeCard));
    replace("problems", data.problems.map((text) => el("li", "", text)));
    for (const cell of document.querySelectorAll("[data-total]")) {
      const key = cell.dataset.total;
      const raw = cell.dataset.format === "rate" ? data.totals.rates[key] : data.totals[key];
      cell.textContent = cell.dataset.format === "rate" ? rate(raw) : count(raw);
      if (key === "dead_letters") cell.parentElement.classList.toggle("bad", raw > 0);
    }
    replace("total-spark", [spark(data.totals.spark)]);
    const topics = data.topics.map((topic) => {
      const li = el("li");
      const a = el("a", "", topic.name);
      a.href = topic.url;
      li.append(a, " ", el("span", "muted", topic.groups.length + " groups: " + topic.groups.join(", ")));
      return li;
    });
    replace("topics", topics.length ? topics : [el("li", "muted", "none")]);
  }

  function marks() {
    for (const link of table.querySelectorAll("thead a[data-key]")) {
      const mark = link.querySelector(".mark");
      if (mark) mark.textContent = link.dataset.key === sort ? (order === "desc" ? "▼" : "▲") : "";
    }
  }

  function stamp(text) {
    const line = document.getElementById("refreshed");
    if (line) line.textContent = text;
  }

  async function refresh() {
    if (document.hidden) return;
    try {
      const response = await fetch("/ui/api/overview", {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
        cache: "no-store",
      });
      if (response.status === 401 || response.status === 403) {
        window.location.assign("/ui/login");
        return;
      }
      if (!response.ok) throw new Error("HTTP " + response.status);
      data = await response.json();
      render();
      stamp("Refreshed " + new Date().toLocaleTimeString() + ", every " + REFRESH_MS / 1000 + " s.");
      document.body.dataset.refreshed = String(Date.now());
    } catch (error) {
      stamp("Refresh failed (" + error.message + "); trying again.");
    }
  }

  table.querySelector("thead").addEventListener("click", (event) => {
    const link = event.target.closest("a[data-key]");
    if (!link) return;
    event.preventDefault();
    const key = link.dataset.key;
    if (key === sort) order = order === "desc" ? "asc" : "desc";
    else { sort = key; order = key === "name" ? "asc" : "desc"; }
    table.dataset.sort = sort;
    table.dataset.order = order;
    history.replaceState(null, "", "/ui?sort=" + encodeURIComponent(sort) + "&order=" + order);
    marks();
    if (data) render(); else refresh();
  });

  refresh();
  setInterval(refresh, REFRESH_MS);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
})();
