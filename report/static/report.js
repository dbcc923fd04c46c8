// neuroscan report: legend, palette switch, token strips, the layer page's prompt selector.
// Data arrive as script files (fetch is refused from file://), loaded on demand.
(function () {
  "use strict";
  const root = document.body.dataset.root || "";
  // Data files assign NEUROSCAN_DATA[name]; a script tag's load event says it has run.
  const cache = (self.NEUROSCAN_DATA = self.NEUROSCAN_DATA || {});
  const pending = {};
  function load(name) {
    if (name in cache) return Promise.resolve(cache[name]);
    if (!pending[name]) {
      pending[name] = new Promise((resolve, reject) => {
        const script = document.createElement("script");
        script.src = root + "data/" + name + ".js";
        script.onload = () => (name in cache ? resolve(cache[name]) : reject(new Error("data file without " + name)));
        script.onerror = () => reject(new Error("missing data file " + script.src));
        document.head.appendChild(script);
      });
    }
    return pending[name];
  }

  const config = cache.config;
  const bands = config.bands;
  const BAND_NAMES = ["grey", "blue", "orange", "red"];
  const BAND_RANGES = [
    `${bands.low} ≤ act ≤ ${bands.high}`, `act < ${bands.low}`,
    `${bands.high} < act ≤ ${bands.red}`, `act > ${bands.red}`,
  ];

  function legend() {
    const box = document.getElementById("legend");
    if (!box) return;
    const order = [3, 2, 0, 1];
    box.className = "legend";
    box.innerHTML = order.map((b) =>
      `<span class="item"><span class="swatch b${b}"></span>${BAND_NAMES[b]} <small>${BAND_RANGES[b]}</small></span>`).join("");
  }

  function palette() {
    const button = document.getElementById("palette");
    const apply = (on) => {
      document.documentElement.dataset.palette = on ? "cb" : "default";
      button.setAttribute("aria-pressed", on ? "true" : "false");
    };
    let on = false;
    try { on = localStorage.getItem("neuroscan-palette") === "cb"; } catch (e) { /* storage may be off */ }
    apply(on);
    button.addEventListener("click", () => {
      on = !on;
      apply(on);
      try { localStorage.setItem("neuroscan-palette", on ? "cb" : "default"); } catch (e) { /* ignore */ }
    });
  }

  function decode(b64, n) {
    const raw = atob(b64);
    const codes = new Array(n);
    for (let t = 0; t < n; t++) codes[t] = (raw.charCodeAt(t >> 2) >> (2 * (t & 3))) & 3;
    return codes;
  }

  function escape(text) {
    return text.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
  }

  // Line breaks and tabs shown as symbols, so that a strip stays one line.
  function visible(tok) {
    return tok.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "");
  }

  // One strip: the prompt's tokens coloured by one neuron's band codes; `mark` outlines a token.
  function strip(tokens, b64, mark, markValue) {
    const codes = b64 ? decode(b64, tokens.length) : tokens.map(() => 0);
    return tokens.map((tok, t) => {
      const cls = "tok b" + codes[t] + (t === mark ? " max" : "");
      const peak = t === mark ? ` · the neuron's max here: ${markValue.toFixed(3)}` : "";
      const title = `${JSON.stringify(tok)} · position ${t} · ${BAND_NAMES[codes[t]]} (${BAND_RANGES[codes[t]]})${peak}`;
      return `<span class="${cls}" data-band="${codes[t]}" title="${escape(title)}">${escape(visible(tok))}</span>`;
    }).join("");
  }

  function neuronLink(layer, neuron) {
    const pages = config.neuron_pages[String(layer)] || [];
    const label = "n" + neuron;
    if (!pages.includes(neuron)) return label;
    return `<a href="${root}neurons/${String(layer).padStart(2, "0")}-${String(neuron).padStart(5, "0")}.html">${label}</a>`;
  }

  async function layerPage() {
    const box = document.getElementById("strips");
    const layer = Number(box.dataset.layer);
    const index = cache["prompt-index"];
    const select = document.getElementById("prompt");
    select.innerHTML = index.map(([pid, id, family, n], i) =>
      `<option value="${i}">${escape(String(id))} · ${escape(family)} · ${n} tokens</option>`).join("");
    const fromHash = () => {
      const m = /p=(\d+)/.exec(location.hash);
      if (!m) return 0;
      const i = index.findIndex((row) => row[0] === Number(m[1]));
      return i < 0 ? 0 : i;
    };
    async function show(i) {
      const [pid, id, family, n] = index[i];
      const chunk = String(Math.floor(i / config.chunk)).padStart(4, "0");
      const [tokens, strips] = await Promise.all([load("prompts/" + chunk), load(`layer-${String(layer).padStart(2, "0")}/${chunk}`)]);
      const toks = tokens[String(pid)];
      const rows = strips[String(pid)] || [];
      document.getElementById("prompt-info").textContent =
        `prompt ${id} (${family}), ${n} tokens: ${rows.length} strip${rows.length === 1 ? "" : "s"}`;
      const up = (value) => value === undefined ? "" : ` (up ${value})`;  // gated MLPs only
      box.innerHTML = rows.map(([neuron, coverage, maxAct, maxPos, minAct, minPos, b64, upMax, upMin]) =>
        `<div class="strip" data-neuron="${neuron}"><span class="label" title="max ${maxAct} at ${maxPos}${up(upMax)}, min ${minAct} at ${minPos}${up(upMin)}">` +
        `${neuronLink(layer, neuron)} <small>${Math.round(coverage * 100)}%</small></span>` +
        `<span class="tokens">${strip(toks, b64, -1)}</span></div>`).join("") ||
        '<p class="empty">No neuron of this layer was kept on this prompt.</p>';
      box.dataset.prompt = String(pid);
    }
    const go = (i) => {
      i = Math.max(0, Math.min(index.length - 1, i));
      select.value = String(i);
      history.replaceState(null, "", "#p=" + index[i][0]);
      return show(i);
    };
    select.addEventListener("change", () => go(Number(select.value)));
    document.getElementById("prev").addEventListener("click", () => go(Number(select.value) - 1));
    document.getElementById("next").addEventListener("click", () => go(Number(select.value) + 1));
    window.addEventListener("hashchange", () => go(fromHash()));
    await go(fromHash());
  }

  function neuronPage() {
    const data = window.NEURON;
    const layerPage = `${root}layers/${String(data.layer).padStart(2, "0")}.html`;
    document.querySelector("#top-prompts tbody").innerHTML = data.top.map((p, rank) =>
      `<tr data-prompt="${p.prompt_id}" data-act="${p.act}"><td>${rank + 1}</td>` +
      `<td><a href="${layerPage}#p=${p.prompt_id}">${escape(String(p.id))}</a></td><td>${escape(p.family)}</td>` +
      `<td>${p.act.toFixed(3)}</td>${data.gated ? `<td class="up">${p.up === null ? "" : p.up.toFixed(3)}</td>` : ""}` +
      `<td>${p.pos}</td><td class="tokens">${strip(p.tokens, p.bands, p.pos, p.act)}</td></tr>`).join("");
    document.querySelector("#families tbody").innerHTML = Object.entries(data.families)
      .sort((a, b) => b[1] - a[1])
      .map(([family, share]) => `<tr><td>${escape(family)}</td><td>${(share * 100).toFixed(1)}%</td>` +
        `<td><span class="bar" style="width:${Math.round(share * 200)}px"></span></td></tr>`).join("");
  }

  legend();
  palette();
  const page = document.body.dataset.page;
  const ready = page === "layer" ? layerPage() : page === "neuron" ? Promise.resolve(neuronPage()) : Promise.resolve();
  ready.then(() => { document.body.dataset.ready = "true"; },
             (err) => { document.body.dataset.ready = "error"; console.error(err); });
})();
