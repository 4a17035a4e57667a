// circuitfind circuit viewer: plain JavaScript and SVG, no library, no network.
// Reads the JSON document in <script id="cf-data"> (circuitfind/view/data.py describes it).
"use strict";
(function () {
  const T0 = performance.now();
  const D = JSON.parse(document.getElementById("cf-data").textContent);
  const SVGNS = "http://www.w3.org/2000/svg";
  const N = D.nodes, R = D.receivers, E = D.edges, C = D.circuits;
  const compare = D.mode === "compare";
  const nEdges = E.s.length;
  const nNodes = N.name.length;
  const W = N.node_w, H = N.node_h;
  const $ = (id) => document.getElementById(id);
  const svg = $("graph"), viewport = $("viewport"), edgeLayer = $("edges"), nodeLayer = $("nodes");
  const info = $("info"), slider = $("size"), sizeBox = $("size-n"), thresholdBox = $("threshold");

  // ---------------------------------------------------------------- helpers
  const fmt = (v) => (v === null || v === undefined ? "none" : String(v));
  const edgeName = (i) => N.name[E.s[i]] + "->" + R.name[E.r[i]];
  const targets = (i) => R.nodes[E.r[i]];
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
  const logits = N.name.indexOf("logits");

  // ---------------------------------------------------------------- header
  $("title").textContent = compare ? C.map((c) => c.label + ": " + c.title).join("   vs   ") : C[0].title;
  document.title = "circuitfind view: " + (compare ? C[0].label + " vs " + C[1].label : C[0].title);
  $("meaning").textContent = C[0].has_scores
    ? "score: " + C[0].kind + (C[0].unit ? " (" + C[0].unit + ")" : "") + ": " + C[0].describe
    : "this circuit has no edge scores";

  // ---------------------------------------------------------------- nodes
  // the renderer's rows and slots, with the slots spread (up to 2.5 times) to the window's
  // shape: tall models would otherwise leave most of a wide window empty
  (function spread() {
    const box = svg.getBoundingClientRect();
    const x0 = Math.min.apply(null, N.x), x1 = Math.max.apply(null, N.x);
    const y0 = Math.min.apply(null, N.y), y1 = Math.max.apply(null, N.y);
    if (x1 <= x0 || box.height <= 0) return;
    const want = (box.width / box.height) * (y1 - y0 + 2 * H) - 2 * W;
    const sx = Math.max(1, Math.min(2.5, want / (x1 - x0)));
    for (let n = 0; n < nNodes; n++) N.x[n] = x0 + (N.x[n] - x0) * sx;
  })();
  const nodeEls = new Array(nNodes);
  const names = $("names");
  for (let n = 0; n < nNodes; n++) {
    const g = document.createElementNS(SVGNS, "g");
    g.setAttribute("class", "node idle");
    g.setAttribute("data-n", n);
    g.setAttribute("data-name", N.name[n]);
    const kind = N.kind[n];
    let shape;
    if (kind === "attention") {
      shape = document.createElementNS(SVGNS, "ellipse");
      shape.setAttribute("cx", N.x[n]); shape.setAttribute("cy", N.y[n]);
      shape.setAttribute("rx", W / 2); shape.setAttribute("ry", H / 2);
    } else {
      shape = document.createElementNS(SVGNS, "rect");
      shape.setAttribute("x", N.x[n] - W / 2); shape.setAttribute("y", N.y[n] - H / 2);
      shape.setAttribute("width", W); shape.setAttribute("height", H);
      shape.setAttribute("rx", 3);
    }
    shape.setAttribute("fill", D.colours.fill[kind]);
    g.appendChild(shape);
    const text = document.createElementNS(SVGNS, "text");
    text.setAttribute("x", N.x[n]); text.setAttribute("y", N.y[n]);
    text.textContent = N.name[n];
    g.appendChild(text);
    nodeLayer.appendChild(g);
    nodeEls[n] = g;
    const option = document.createElement("option");
    option.value = N.name[n];
    names.appendChild(option);
  }

  // ---------------------------------------------------------------- edges (created lazily)
  const scoreOf = (i) => E.score[i];
  let maxAbs = 0;
  const nRef = compare ? nEdges : Math.max(1, C[0].n_kept);
  for (let i = 0; i < Math.min(nRef, nEdges); i++) {
    const v = scoreOf(i);
    if (v !== null && Math.abs(v) > maxAbs) maxAbs = Math.abs(v);
  }
  const width = (i) => {
    const v = scoreOf(i);
    if (v === null || maxAbs === 0) return 1.0;
    return 0.5 + 4.5 * Math.min(Math.abs(v) / maxAbs, 1.0);
  };
  const BEND = {q: -10, k: 0, v: 10};
  function pathD(s, t, kind) {
    const x1 = N.x[s], y1 = N.y[s] + H / 2, x2 = N.x[t], y2 = N.y[t] - H / 2;
    const dx = x2 - x1, dy = y2 - y1, len = Math.hypot(dx, dy) || 1;
    // long edges nearly straight down a column would cross the nodes between: bow them out
    let bow = BEND[kind] || 0;
    if (Math.abs(dx) < W && dy > 2.5 * H) bow += (x1 >= D.nodes.mid ? 1 : -1) * Math.min(0.18 * dy, 2 * W);
    const cx = (x1 + x2) / 2 + (dy / len) * bow, cy = (y1 + y2) / 2 - (dx / len) * bow;
    return "M" + x1.toFixed(1) + "," + y1.toFixed(1) + "Q" + cx.toFixed(1) + "," + cy.toFixed(1) + " " + x2.toFixed(1) + "," + y2.toFixed(1);
  }
  D.nodes.mid = (Math.min.apply(null, N.x) + Math.max.apply(null, N.x)) / 2;
  const edgeEls = new Array(nEdges);   // per edge: its paths (one per node reading the receiver)
  let created = 0;
  function colourOf(i) {
    if (compare) return D.colours.compare[membership[i]];
    if (colourMode === "sign") {
      const v = scoreOf(i);
      if (v === null || v === 0) return D.colours.sign.zero;
      return C[0].sign * v > 0 ? D.colours.sign.helps : D.colours.sign.hurts;
    }
    return D.colours.receiver[R.kind[E.r[i]]];
  }
  function create(upto) {
    if (upto <= created) return;
    const frag = document.createDocumentFragment();
    for (let i = upto - 1; i >= created; i--) {   // weaker edges below stronger ones
      const kind = R.kind[E.r[i]];
      const ts = targets(i), els = [];
      for (let j = 0; j < ts.length; j++) {
        const p = document.createElementNS(SVGNS, "path");
        p.setAttribute("d", pathD(E.s[i], ts[j], kind));
        p.setAttribute("stroke-width", width(i).toFixed(2));
        p.setAttribute("stroke", colourOf(i));
        p.setAttribute("class", "edge off");
        p.setAttribute("data-e", i);
        p.setAttribute("data-t", ts[j]);
        els.push(p);
        frag.appendChild(p);
      }
      edgeEls[i] = els;
    }
    edgeLayer.insertBefore(frag, edgeLayer.firstChild);
    created = upto;
  }

  // ---------------------------------------------------------------- which edges are drawn
  const visible = new Uint8Array(nEdges);
  const degree = new Int32Array(nNodes);   // drawn edges touching each node
  let membership = compare ? new Array(nEdges).fill("shared") : null;
  let colourMode = "receiver";
  let k = 0;
  function setVisible(i, on) {
    if (visible[i] === (on ? 1 : 0)) return;
    visible[i] = on ? 1 : 0;
    const delta = on ? 1 : -1;
    const els = edgeEls[i];
    for (let j = 0; j < els.length; j++) els[j].classList.toggle("off", !on);
    const touched = [E.s[i]].concat(targets(i));
    for (let j = 0; j < touched.length; j++) {
      const n = touched[j];
      const before = degree[n];
      degree[n] += delta;
      if ((before === 0) !== (degree[n] === 0)) nodeEls[n].classList.toggle("idle", degree[n] === 0);
    }
  }
  const maxK = compare ? Math.max(C[0].n_kept, C[1].n_kept) : nEdges;
  let shownA = 0, shownB = 0, shared = 0;
  function setSize(newK) {
    const t = performance.now();
    newK = Math.max(0, Math.min(maxK, Math.round(newK)));
    if (compare) {
      create(nEdges);
      const capA = Math.min(newK, C[0].n_kept), capB = Math.min(newK, C[1].n_kept);
      shownA = 0; shownB = 0; shared = 0;
      for (let i = 0; i < nEdges; i++) {
        const a = E.rank[0][i] >= 0 && E.rank[0][i] < capA, b = E.rank[1][i] >= 0 && E.rank[1][i] < capB;
        shownA += a; shownB += b; shared += a && b;
        const m = a && b ? "shared" : a ? "a" : "b";
        if ((a || b) && m !== membership[i]) {
          membership[i] = m;
          for (const p of edgeEls[i]) p.setAttribute("stroke", colourOf(i));
        }
        setVisible(i, a || b);
      }
    } else {
      create(newK);
      if (newK > k) for (let i = k; i < newK; i++) setVisible(i, true);
      else for (let i = newK; i < k; i++) setVisible(i, false);
    }
    k = newK;
    slider.value = k;
    sizeBox.value = k;
    if (pinned !== null) highlight();
    describeSize();
    lastUpdateMs = performance.now() - t;
  }
  let lastUpdateMs = 0;

  // ---------------------------------------------------------------- size read-out and curve
  function faithfulnessAt(c, size) {
    const curve = c.curve;
    if (!curve) return null;
    const s = curve.sizes, f = curve.faithfulness;
    for (let i = 0; i < s.length; i++) if (s[i] === size) return {value: f[i], exact: true};
    if (size < s[0] || size > s[s.length - 1]) return null;
    for (let i = 1; i < s.length; i++) {
      if (size < s[i]) {
        const w = (size - s[i - 1]) / (s[i] - s[i - 1]);
        return {value: f[i - 1] + w * (f[i] - f[i - 1]), exact: false, lo: s[i - 1], hi: s[i]};
      }
    }
    return null;
  }
  function describeSize() {
    const count = $("count"), faith = $("faith");
    if (compare) {
      const union = shownA + shownB - shared;
      const jac = union === 0 ? 1 : shared / union;
      count.textContent = union + " edges drawn: " + shared + " shared, " + (shownA - shared) + " only in " + C[0].label + ", " + (shownB - shared) + " only in " + C[1].label;
      count.setAttribute("data-count", union);
      faith.textContent = "Jaccard " + jac.toFixed(3) + " (edges; top " + Math.min(k, C[0].n_kept) + " of " + C[0].label + ", top " + Math.min(k, C[1].n_kept) + " of " + C[1].label + ")";
      faith.setAttribute("data-jaccard", jac);
      return;
    }
    const c = C[0];
    count.textContent = k + " of " + D.n_graph_edges + " edges" + (k === c.n_kept ? " (the discovered circuit)" : "");
    count.setAttribute("data-count", k);
    const at = faithfulnessAt(c, k);
    if (at === null) {
      faith.textContent = c.curve ? "faithfulness: not measured at this size" : "faithfulness: no stored curve";
      faith.removeAttribute("data-faithfulness");
    } else {
      faith.textContent = "normalized faithfulness " + (at.exact ? "" : "≈ ") + at.value.toFixed(3) +
        (at.exact ? " (measured at " + k + " edges)" : " (interpolated between " + at.lo + " and " + at.hi + " edges)");
      faith.setAttribute("data-faithfulness", at.value);
    }
    drawMarker();
  }
  // the stored curve: faithfulness over log(edges), with a marker at the slider's size
  const curveSvg = $("curve");
  let curveX = null, curveY = null;
  (function drawCurve() {
    const c = C[0].curve;
    if (compare || !c || c.sizes.length === 0) { curveSvg.style.display = "none"; return; }
    const w = 260, h = 90, l = 30, r = 8, t = 8, b = 18;
    const xs = c.sizes.map((s) => Math.log10(Math.max(s, 1)));
    const lo = Math.min.apply(null, xs), hi = Math.max(Math.log10(Math.max(D.n_graph_edges, 2)), lo + 1);
    const fs = c.faithfulness.concat([0, 1]);
    const fmin = Math.min.apply(null, fs), fmax = Math.max.apply(null, fs);
    curveX = (s) => l + (Math.log10(Math.max(s, 1)) - lo) / (hi - lo) * (w - l - r);
    curveY = (f) => t + (fmax - f) / ((fmax - fmin) || 1) * (h - t - b);
    let d = "";
    c.sizes.forEach((s, i) => { d += (i ? "L" : "M") + curveX(s).toFixed(1) + "," + curveY(c.faithfulness[i]).toFixed(1); });
    curveSvg.innerHTML = '<line x1="' + l + '" x2="' + (w - r) + '" y1="' + curveY(1) + '" y2="' + curveY(1) + '" class="ref"/>' +
      '<line x1="' + l + '" x2="' + (w - r) + '" y1="' + curveY(0) + '" y2="' + curveY(0) + '" class="ref"/>' +
      '<text x="' + (l - 3) + '" y="' + (curveY(1) + 3) + '" class="tick" text-anchor="end">1</text>' +
      '<text x="' + (l - 3) + '" y="' + (curveY(0) + 3) + '" class="tick" text-anchor="end">0</text>' +
      '<text x="' + l + '" y="' + (h - 4) + '" class="tick">edges (log) →</text>' +
      '<path d="' + d + '" class="line"/>' +
      c.sizes.map((s, i) => '<circle cx="' + curveX(s) + '" cy="' + curveY(c.faithfulness[i]) + '" r="2" class="pt"><title>' + s + " edges: " + c.faithfulness[i] + '</title></circle>').join("") +
      '<line id="marker" y1="' + t + '" y2="' + (h - b) + '" class="marker"/>';
    curveSvg.setAttribute("viewBox", "0 0 " + w + " " + h);
  })();
  function drawMarker() {
    const m = document.getElementById("marker");
    if (!m || !curveX) return;
    const x = curveX(Math.max(k, 1));
    m.setAttribute("x1", x); m.setAttribute("x2", x);
  }

  // ---------------------------------------------------------------- hover
  const kindLabel = (i) => R.input[E.r[i]];
  function scoreText(v, c) {
    if (v === null || v === undefined) return "none";
    return String(v) + (c.unit ? " " + c.unit : "");
  }
  function showEdge(i, target) {
    const rows = [["edge", edgeName(i)], ["sender", N.name[E.s[i]]],
                  ["receiver", R.name[E.r[i]] + (targets(i).length > 1 ? " (read by " + targets(i).map((n) => N.name[n]).join(", ") + ")" : "")],
                  ["input", kindLabel(i)]];
    if (compare) {
      [0, 1].forEach((c) => {
        const v = c === 0 ? E.score[i] : E.score2[i];
        rows.push(["score in " + C[c].label, scoreText(v, C[c]) + " (" + C[c].kind + ")"]);
        rows.push(["rank in " + C[c].label, E.rank[c][i] >= 0 ? (E.rank[c][i] + 1) + " of " + C[c].n_kept : "not in " + C[c].label]);
      });
    } else {
      rows.push(["score", scoreText(E.score[i], C[0])]);
      rows.push(["kind", C[0].kind + (C[0].unit ? ", " + C[0].unit : "")]);
      rows.push(["rank", (i + 1) + " of " + nEdges + " (kept edges first, then by " + C[0].key + ")"]);
      rows.push(["in the circuit", i < C[0].n_kept ? "yes" : "no (added by the slider)"]);
    }
    info.innerHTML = "<h3>edge</h3>" + table(rows);
    info.setAttribute("data-edge", edgeName(i));
    info.setAttribute("data-score", fmt(E.score[i]));
    info.setAttribute("data-rank", i + 1);
  }
  function table(rows) {
    return "<table>" + rows.map((r) => "<tr><th>" + esc(r[0]) + "</th><td>" + esc(r[1]) + "</td></tr>").join("") + "</table>";
  }
  // adjacency of every embedded edge, by node
  const outOf = Array.from({length: nNodes}, () => []), inTo = Array.from({length: nNodes}, () => []);
  for (let i = 0; i < nEdges; i++) {
    outOf[E.s[i]].push(i);
    for (const t of targets(i)) inTo[t].push(i);
  }
  function edgeList(list, end) {
    const shown = list.filter((i) => visible[i]);
    shown.sort((a, b) => Math.abs(scoreOf(b) || 0) - Math.abs(scoreOf(a) || 0));
    const limit = 25;
    let html = "<ul>" + shown.slice(0, limit).map((i) => "<li><span class='nm'>" + esc(end(i)) + "</span> " +
      esc(scoreText(scoreOf(i), C[0])) + "</li>").join("") + "</ul>";
    if (shown.length > limit) html += "<p>… and " + (shown.length - limit) + " more</p>";
    return [shown.length, html];
  }
  function showNode(n) {
    const [nIn, inHtml] = edgeList(inTo[n], (i) => N.name[E.s[i]] + " (" + kindLabel(i) + ")");
    const [nOut, outHtml] = edgeList(outOf[n], (i) => R.name[E.r[i]]);
    info.innerHTML = "<h3>" + esc(N.name[n]) + " <small>(" + esc(N.kind[n]) + ")</small></h3>" +
      "<h4>" + nIn + " in-edges</h4>" + inHtml + "<h4>" + nOut + " out-edges</h4>" + outHtml +
      (pinned === n ? "<p>pinned: paths through it to the logits are highlighted</p>" : "<p>click to pin</p>");
    info.setAttribute("data-node", N.name[n]);
    info.setAttribute("data-in", nIn);
    info.setAttribute("data-out", nOut);
  }
  let hovered = null;
  svg.addEventListener("mouseover", (ev) => {
    const el = ev.target;
    if (hovered !== null) { for (const p of edgeEls[hovered]) p.classList.remove("hover"); hovered = null; }
    if (el.classList && el.classList.contains("edge")) {
      hovered = +el.getAttribute("data-e");
      for (const p of edgeEls[hovered]) p.classList.add("hover");
      showEdge(hovered, +el.getAttribute("data-t"));
      return;
    }
    const g = el.closest && el.closest(".node");
    if (g) showNode(+g.getAttribute("data-n"));
  });

  // ---------------------------------------------------------------- pin: paths through a node to the logits
  let pinned = null;
  function highlight() {
    svg.classList.toggle("pinning", pinned !== null);
    for (const el of edgeLayer.querySelectorAll(".hl")) el.classList.remove("hl");
    for (const el of nodeLayer.querySelectorAll(".hl")) el.classList.remove("hl");
    if (pinned === null) { svg.removeAttribute("data-pinned"); return; }
    svg.setAttribute("data-pinned", N.name[pinned]);
    const fwd = Array.from({length: nNodes}, () => []), bwd = Array.from({length: nNodes}, () => []);
    for (let i = 0; i < created; i++) {
      if (!visible[i]) continue;
      for (const p of edgeEls[i]) {
        const t = +p.getAttribute("data-t");
        fwd[E.s[i]].push(t); bwd[t].push(E.s[i]);
      }
    }
    const reach = (start, adj) => {
      const seen = new Uint8Array(nNodes), stack = [start];
      seen[start] = 1;
      while (stack.length) for (const m of adj[stack.pop()]) if (!seen[m]) { seen[m] = 1; stack.push(m); }
      return seen;
    };
    const toLogits = logits >= 0 ? reach(logits, bwd) : new Uint8Array(nNodes);
    const down = reach(pinned, fwd), up = reach(pinned, bwd);
    nodeEls[pinned].classList.add("hl");
    let count = 0;
    for (let i = 0; i < created; i++) {
      if (!visible[i]) continue;
      const s = E.s[i];
      for (const p of edgeEls[i]) {
        const t = +p.getAttribute("data-t");
        if ((down[s] && toLogits[t]) || (up[t] && toLogits[pinned])) {
          p.classList.add("hl"); nodeEls[s].classList.add("hl"); nodeEls[t].classList.add("hl"); count++;
        }
      }
    }
    svg.setAttribute("data-highlighted", count);
  }
  function pin(n) {
    pinned = pinned === n ? null : n;
    highlight();
    if (n !== null) showNode(n);
  }

  // ---------------------------------------------------------------- pan and zoom
  let tx = 0, ty = 0, scale = 1;
  const apply = () => viewport.setAttribute("transform", "translate(" + tx.toFixed(2) + "," + ty.toFixed(2) + ") scale(" + scale.toFixed(4) + ")");
  const bounds = {x0: Math.min.apply(null, N.x) - W, x1: Math.max.apply(null, N.x) + W,
                  y0: Math.min.apply(null, N.y) - H, y1: Math.max.apply(null, N.y) + H};
  function fit() {
    const box = svg.getBoundingClientRect();
    const w = bounds.x1 - bounds.x0, h = bounds.y1 - bounds.y0;
    scale = Math.min(box.width / w, box.height / h);
    tx = (box.width - w * scale) / 2 - bounds.x0 * scale;
    ty = (box.height - h * scale) / 2 - bounds.y0 * scale;
    apply();
  }
  function centreOn(n) {
    const box = svg.getBoundingClientRect();
    scale = Math.max(scale, 1.5);
    tx = box.width / 2 - N.x[n] * scale;
    ty = box.height / 2 - N.y[n] * scale;
    apply();
  }
  svg.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const box = svg.getBoundingClientRect();
    const mx = ev.clientX - box.left, my = ev.clientY - box.top;
    const f = Math.exp(-ev.deltaY * 0.0015);
    const s = Math.max(0.05, Math.min(40, scale * f));
    tx = mx - (mx - tx) * (s / scale); ty = my - (my - ty) * (s / scale);
    scale = s;
    apply();
  }, {passive: false});
  let drag = null;
  svg.addEventListener("mousedown", (ev) => { drag = {x: ev.clientX, y: ev.clientY, tx: tx, ty: ty, moved: false}; });
  window.addEventListener("mousemove", (ev) => {
    if (!drag) return;
    const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
    if (drag.moved) { tx = drag.tx + dx; ty = drag.ty + dy; apply(); }
  });
  window.addEventListener("mouseup", (ev) => {
    if (drag && !drag.moved) {
      const g = ev.target.closest && ev.target.closest(".node");
      if (g) pin(+g.getAttribute("data-n"));
      else if (pinned !== null && !(ev.target.classList && ev.target.classList.contains("edge")) && svg.contains(ev.target)) pin(pinned);
    }
    drag = null;
  });

  // ---------------------------------------------------------------- controls
  slider.max = maxK; sizeBox.max = maxK;
  // while the slider moves, edges are drawn without anti-aliasing (a third of the raster
  // work); 250 ms after the last move they are drawn smooth again
  let settle = null;
  slider.addEventListener("input", () => {
    svg.classList.add("moving");
    clearTimeout(settle);
    settle = setTimeout(() => svg.classList.remove("moving"), 250);
    setSize(+slider.value);
  });
  sizeBox.addEventListener("change", () => setSize(+sizeBox.value));
  if (compare || !C[0].has_scores) { thresholdBox.disabled = true; }
  $("threshold-label").textContent = compare ? "" : C[0].key + " ≥";
  const keyOf = (i) => { const v = scoreOf(i); if (v === null) return -Infinity; return C[0].absolute ? Math.abs(v) : C[0].sign * v; };
  thresholdBox.addEventListener("change", () => {
    const t = +thresholdBox.value;
    let size = nEdges;
    for (let i = 0; i < nEdges; i++) {
      if (keyOf(i) < t) { size = i; break; }   // each group (kept, the rest) is sorted by the key
    }
    setSize(size);
  });
  $("colour").addEventListener("change", (ev) => {
    colourMode = ev.target.value;
    for (let i = 0; i < created; i++) for (const p of edgeEls[i]) p.setAttribute("stroke", colourOf(i));
    legend();
  });
  if (compare) $("colour").style.display = "none";
  function find() {
    const q = $("search").value.trim().toLowerCase();
    if (!q) return;
    let n = N.name.findIndex((x) => x.toLowerCase() === q);
    if (n < 0) n = N.name.findIndex((x) => x.toLowerCase().startsWith(q));
    if (n < 0) { $("search").classList.add("miss"); return; }
    $("search").classList.remove("miss");
    centreOn(n);
    pinned = null;
    pin(n);
  }
  $("search").addEventListener("change", find);
  $("search").addEventListener("keydown", (ev) => { if (ev.key === "Enter") find(); });
  $("fit").addEventListener("click", fit);
  function legend() {
    let items;
    if (compare) items = [["in both", D.colours.compare.shared], ["only in " + C[0].label, D.colours.compare.a], ["only in " + C[1].label, D.colours.compare.b]];
    else if (colourMode === "sign") items = [[C[0].helps, D.colours.sign.helps], [C[0].hurts, D.colours.sign.hurts], ["score 0 / none", D.colours.sign.zero]];
    else items = [["q input", D.colours.receiver.q], ["k input", D.colours.receiver.k], ["v input", D.colours.receiver.v], ["MLP input", D.colours.receiver.mlp], ["logits", D.colours.receiver.logits]];
    $("legend").innerHTML = items.map((it) => '<span><i style="background:' + it[1] + '"></i>' + esc(it[0]) + "</span>").join("") + "<span>pen width ∝ |score|</span>";
  }

  // ---------------------------------------------------------------- export
  function svgText() {
    const clone = svg.cloneNode(true);
    for (const el of clone.querySelectorAll(".off")) el.remove();
    clone.classList.remove("moving");
    const box = svg.getBoundingClientRect();
    clone.setAttribute("xmlns", SVGNS);
    clone.setAttribute("width", Math.round(box.width));
    clone.setAttribute("height", Math.round(box.height));
    clone.setAttribute("viewBox", "0 0 " + Math.round(box.width) + " " + Math.round(box.height));
    const style = document.createElementNS(SVGNS, "style");
    style.textContent = $("svg-style").textContent;
    clone.insertBefore(style, clone.firstChild);
    const bg = document.createElementNS(SVGNS, "rect");
    bg.setAttribute("width", "100%"); bg.setAttribute("height", "100%"); bg.setAttribute("fill", "#ffffff");
    clone.insertBefore(bg, style.nextSibling);
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + new XMLSerializer().serializeToString(clone);
  }
  function download(blob, name) {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = name;
    document.body.appendChild(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  }
  $("export-svg").addEventListener("click", () => download(new Blob([svgText()], {type: "image/svg+xml"}), "circuit-view.svg"));
  $("export-png").addEventListener("click", () => {
    const text = svgText(), box = svg.getBoundingClientRect(), ratio = 2;
    const img = new Image();
    img.onload = () => {
      const canvas = document.createElement("canvas");
      canvas.width = Math.round(box.width * ratio); canvas.height = Math.round(box.height * ratio);
      const ctx = canvas.getContext("2d");
      ctx.fillStyle = "#ffffff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
      canvas.toBlob((blob) => download(blob, "circuit-view.png"), "image/png");
    };
    img.onerror = () => console.warn("PNG export: the SVG could not be drawn");
    img.src = "data:image/svg+xml;base64," + btoa(unescape(encodeURIComponent(text)));
  });

  // ---------------------------------------------------------------- start
  legend();
  setSize(compare ? maxK : C[0].n_kept);
  fit();   // after the header's read-outs are filled: they set the drawing's height
  window.addEventListener("resize", fit);
  const readyMs = performance.now() - T0;
  // a small API for tests and benchmarks (the page works without it)
  window.circuitView = {
    setSize: setSize, pin: (name) => { const n = N.name.indexOf(name); if (n >= 0) { pinned = null; pin(n); } },
    unpin: () => { pinned = null; highlight(); },
    size: () => k, lastUpdateMs: () => lastUpdateMs, readyStart: T0, readyMs: readyMs, edgeName: edgeName,
    svgText: svgText,
  };
  document.body.setAttribute("data-ready", "1");
})();
