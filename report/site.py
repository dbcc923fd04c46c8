"""Write the static site: pages (bounded: an index, one page per layer, one per listed neuron)
and the data they load in chunks (``data/*.js``, loaded by script tags so that the site works
from ``file://``, where browsers refuse ``fetch``).

A layer page loads the chunk holding the selected prompt: its tokens and, for that layer, its
strips (the ``strips`` widest-covering kept neurons, band codes as base64). Pages stay the
same size whatever the corpus; the data grow linearly with it, at most ``strips`` rows a
(prompt, layer).
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from neuroscan import schema
from neuroscan.config import ReportConfig
from neuroscan.errors import UserError, make_dir
from neuroscan.manifest import Manifest, blue_flood_line, verification_line
from report import data, plots
from results.run import open_run

STATIC = Path(__file__).parent / "static"


def build(options: ReportConfig, notice: Callable[[str], None] | None = None) -> Path:
    """Write the site of the scan in ``options.dir`` to ``options.out`` (default ``DIR/report/``);
    returns the path of its index.html.

    The scan's directory is only read, so a site elsewhere reports a scan on read-only storage.
    A scan that has not completed (killed, or still running) is reported as far as its
    committed parts go, and marked partial (`partial_line`) on the index page; ``notice`` is
    told that line.

    The site is built in ``.NAME.tmp`` beside its directory; an earlier report there is
    renamed to ``.NAME.old`` only once the new one is whole, and removed once the new one is
    in place, so a write that fails (a full disk) leaves the earlier report as it was."""
    options.validate()
    run = open_run(options.dir, verify=True)
    partial = partial_line(run.manifest)
    if partial and notice is not None:
        notice(partial)
    site = run.out / "report" if options.out is None else Path(options.out)
    if site.is_file() or (site.is_dir() and any(site.iterdir()) and not (site / "index.html").is_file()):
        raise UserError(
            f"--out {site} is {'a file' if site.is_file() else 'not empty and holds no report'}: choose a new directory, or an earlier report's"
        )
    if os.path.ismount(site):  # the report is built beside it, on another disk, and could not be renamed there
        raise UserError(f"--out {site} is a mount point: give a directory in it, e.g. --out {site / 'report'}")
    make_dir(site.parent, site)
    staging, earlier = (site.parent / f".{site.name}.{end}" for end in ("tmp", "old"))
    if earlier.is_dir() and not site.exists():  # a replacement cut short between its two renames
        earlier.rename(site)
    for leftover in (staging, earlier):
        shutil.rmtree(leftover, ignore_errors=True)
    had = (site / "index.html").is_file()
    try:
        _write(run, staging, options)
        if site.exists():
            site.rename(earlier)
        staging.rename(site)
    except BaseException as err:
        if earlier.is_dir() and not site.exists():
            earlier.rename(site)  # an earlier report stays as it was
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):
            raise UserError(
                f"writing the report to {site} failed ({err.strerror or err}): fix the disk (space, permissions), "
                "or give another place with --out, and run it again"
                + ("; the earlier report is intact" if had else "; nothing was written")
            ) from None
        raise
    shutil.rmtree(earlier, ignore_errors=True)
    return site / "index.html"


def partial_line(manifest: Manifest) -> str | None:
    """For a scan that has not completed, how much of it is committed, in one line; else None."""
    if manifest.complete:
        return None
    total = manifest.corpus.prompts
    of = f" of {total:,}" if total is not None else ""
    return f"partial: {manifest.totals.prompts:,}{of} prompts committed; the scan was interrupted or is still running"


def _write(run, staging: Path, options: ReportConfig) -> None:
    for sub in ("static", "plots", "layers", "neurons", "data/prompts"):
        (staging / sub).mkdir(parents=True, exist_ok=True)
    for f in STATIC.iterdir():
        shutil.copy(f, staging / "static" / f.name)

    prompts = data.prompts(run)
    ids, lengths = prompts["prompt_id"].to_numpy(), prompts["n_tokens"].to_numpy()
    families = [f or "(none)" for f in prompts["family"].to_pylist()]
    tokens, user_ids = prompts["tokens"].to_pylist(), prompts["id"].to_pylist()
    family_size = dict(sorted(Counter(families).items()))
    position = {p: i for i, p in enumerate(ids.tolist())}
    for c in range(0, len(ids), options.chunk):
        _write_chunk(
            staging / "data" / "prompts" / f"{c // options.chunk:04d}.js",
            f"prompts/{c // options.chunk:04d}",
            {str(p): t for p, t in zip(ids[c : c + options.chunk].tolist(), tokens[c : c + options.chunk])},
        )
    index = [list(row) for row in zip(ids.tolist(), user_ids, families, lengths.tolist())]
    _write_chunk(staging / "data" / "prompt-index.js", "prompt-index", index)

    top = data.top_neurons(run, options.neurons_per_layer)
    listed: dict[int, list[dict]] = {}
    for row in top.to_pylist():
        listed.setdefault(row["layer"], []).append(row)
    config = {
        "bands": asdict(run.manifest.bands),
        "chunk": options.chunk,
        "n_layers": run.n_layers,
        "neuron_pages": {str(layer): sorted(r["neuron"] for r in rows) for layer, rows in listed.items()},
    }
    _write_chunk(staging / "data" / "config.js", "config", config)

    for layer in range(run.n_layers):
        rows = run.read("activations", [c for c in schema.ACTIVATIONS.names if c != "layer"], layer)
        _write_layer(staging, layer, rows, ids, lengths, options)
        neurons = listed.get(layer, [])
        if neurons:
            mine = rows.filter(pc.is_in(rows["neuron"], pa.array([n["neuron"] for n in neurons], pa.int32())))
            freq = data.family_frequency(mine, ids, np.array(families), family_size)
            # Band codes only of the (prompt, neuron) pairs the pages show: each neuron's top prompts.
            key = mine["prompt_id"].to_numpy().astype(np.int64) << 32 | mine["neuron"].to_numpy()
            wanted = np.array([p << 32 | n["neuron"] for n in neurons for p in n["top_prompt_ids"]], np.int64)
            shown = mine.filter(pa.array(np.isin(key, wanted)))
            bands_of = {
                (p, n): (b, up)
                for p, n, b, up in zip(*(shown[c].to_pylist() for c in ("prompt_id", "neuron", "bands", "up_at_max")))
            }
            for neuron in neurons:
                top = [
                    {
                        "prompt_id": p,
                        "id": user_ids[position[p]],
                        "family": families[position[p]],
                        "act": act,
                        "pos": pos,
                        "tokens": tokens[position[p]],
                        "bands": _b64(bands_of[(p, neuron["neuron"])][0]),
                        "up": bands_of[(p, neuron["neuron"])][1],
                    }
                    for p, act, pos in zip(neuron["top_prompt_ids"], neuron["top_acts"], neuron["top_pos"])
                ]
                _write_neuron(staging, neuron, top, freq[neuron["neuron"]])
        (staging / "layers" / f"{layer:02d}.html").write_text(_layer_page(run, layer, neurons, options))

    spread = data.layer_spread(run, ["n_selected", "n_kept", "red_coverage", "blue_coverage"])
    plots.kept_per_layer(spread, staging / "plots" / "kept-per-layer.png")
    plots.coverage_by_depth(spread, run.manifest.bands, staging / "plots" / "coverage-by-depth.png")
    (staging / "index.html").write_text(_index_page(run, family_size))


def _write_chunk(path: Path, name: str, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"(self.NEUROSCAN_DATA = self.NEUROSCAN_DATA || {{}})[{json.dumps(name)}] = {_json(payload)};\n")


def _json(payload) -> str:
    """JSON safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` (which can only occur in
    strings) as ``\\u`` escapes, so no text (``</script>``, ``<!--<script``) can end the
    element or switch the HTML parser into the state where it swallows the page's scripts."""
    text = json.dumps(payload, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _write_layer(staging: Path, layer: int, rows, ids: np.ndarray, lengths: np.ndarray, options: ReportConfig) -> None:
    picked = data.strips(rows, ids, lengths, options.strips)
    chunk_of = np.searchsorted(ids, picked["prompt_id"].to_numpy()) // options.chunk
    chunks: dict[int, dict[str, list]] = {c: {} for c in range(-(-len(ids) // options.chunk))}
    names = ("prompt_id", "neuron", "coverage", "max_act", "max_pos", "min_act", "min_pos", "bands")
    columns = [picked[c].to_pylist() for c in (*names, "up_at_max", "up_at_min")]
    for c, (prompt_id, neuron, coverage, max_act, max_pos, min_act, min_pos, bands, up_max, up_min) in zip(
        chunk_of.tolist(), zip(*columns)
    ):
        strip = [neuron, round(coverage, 4), round(max_act, 3), max_pos, round(min_act, 3), min_pos, _b64(bands)]
        if up_max is not None:  # a gated MLP: up's value at the max and the min
            strip += [round(up_max, 3), round(up_min, 3)]
        chunks[c].setdefault(str(prompt_id), []).append(strip)
    for c, payload in chunks.items():
        _write_chunk(staging / "data" / f"layer-{layer:02d}" / f"{c:04d}.js", f"layer-{layer:02d}/{c:04d}", payload)


def _write_neuron(staging: Path, neuron: dict, top: list[dict], frequency: dict) -> None:
    layer, index = neuron["layer"], neuron["neuron"]
    gated = any(p["up"] is not None for p in top)
    payload = {
        "layer": layer,
        "neuron": index,
        "n_prompts": neuron["n_prompts"],
        "n_red": neuron["n_red"],
        "max_act": neuron["max_act"],
        "top": top,
        "families": frequency,
        "gated": gated,
    }
    up_column, up_hint = "", ""
    if gated:
        up_column = '<th title="up_proj at the max token: act = silu(gate) x up">up</th>'
        up_hint = (
            " A gated MLP's activation is silu(gate) × up: <i>up</i> is up_proj's value at the max token, "
            "and max / up the gate's SiLU there."
        )
    title = f"Layer {layer} · neuron {index}"
    body = f"""<h1>{title}</h1>
<p class="stats">kept on <b>{neuron["n_prompts"]}</b> prompts, red on <b>{neuron["n_red"]}</b>, corpus max <b>{neuron["max_act"]:.3f}</b></p>
<div id="legend"></div>
<h2>Max-activating prompts</h2>
<p class="hint">The outlined token is where the neuron peaks; hover a token for its band.{up_hint}</p>
<table id="top-prompts"><thead><tr><th>#</th><th>prompt</th><th>family</th><th>max</th>{up_column}<th>at</th><th>tokens</th></tr></thead><tbody></tbody></table>
<h2>Kept on, by family</h2>
<table id="families"><thead><tr><th>family</th><th>share of its prompts</th><th></th></tr></thead><tbody></tbody></table>
<script>window.NEURON = {_json(payload)};</script>"""
    nav = f'<a href="../index.html">index</a> · <a href="../layers/{layer:02d}.html">layer {layer}</a>'
    (staging / "neurons" / f"{layer:02d}-{index:05d}.html").write_text(
        _page(title, "neuron", body, root="../", nav=nav)
    )


def _page(title: str, kind: str, body: str, root: str, nav: str = "", extra: str = "") -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)} · neuroscan</title>
<link rel="stylesheet" href="{root}static/report.css"></head>
<body data-page="{kind}" data-root="{root}">
<header><nav>{nav}</nav><button id="palette" type="button" aria-pressed="false">colour-blind palette</button></header>
<main>
{body}
</main>
<script src="{root}data/config.js"></script>{extra}
<script src="{root}static/report.js"></script>
</body></html>
"""


def _layer_page(run, layer: int, neurons: list[dict], options: ReportConfig) -> str:
    nav = ['<a href="../index.html">index</a>']
    if layer > 0:
        nav.append(f'<a href="{layer - 1:02d}.html">◀ layer {layer - 1}</a>')
    if layer + 1 < run.n_layers:
        nav.append(f'<a href="{layer + 1:02d}.html">layer {layer + 1} ▶</a>')
    links = " ".join(
        f'<a href="../neurons/{layer:02d}-{n["neuron"]:05d}.html" title="red on {n["n_red"]} prompts, max {n["max_act"]:.2f}">{n["neuron"]}</a>'
        for n in neurons
    )
    body = f"""<h1>Layer {layer}</h1>
<div id="legend"></div>
<p class="top-neurons">Most often red here: {links or "none"}</p>
<div class="picker"><label>Prompt <select id="prompt"></select></label>
<button id="prev" type="button">◀</button><button id="next" type="button">▶</button></div>
<p id="prompt-info"></p>
<p class="hint">One strip per kept neuron{f", at most {options.strips}" if options.strips else ""}: half of them the neurons above {run.manifest.bands.high:g} on most tokens, the rest the widest of the others; widest coverage (red, orange or blue tokens) first. Hover a token for its band, a label for the neuron's values.</p>
<div id="strips" data-layer="{layer}"></div>"""
    return _page(
        f"Layer {layer}",
        "layer",
        body,
        root="../",
        nav=" · ".join(nav),
        extra='\n<script src="../data/prompt-index.js"></script>',
    )


def _index_page(run, family_size: dict) -> str:
    m = run.manifest
    totals, timings, bands, cap = m.totals, m.timings, m.bands, m.selection.max_per_layer
    rows = [
        ("model", f"{m.model.id} ({m.model.dtype})"),
        (
            "bands",
            f"red &gt; {bands.red:g}, orange {bands.high:g}–{bands.red:g}, grey {bands.low:g}–{bands.high:g}, blue &lt; {bands.low:g}",
        ),
        ("kept per (prompt, layer)", f"at most {cap}" if cap else "every selected neuron"),
        ("prompts", f"{totals.prompts:,} ({len(family_size)} famil{'y' if len(family_size) == 1 else 'ies'})"),
        ("tokens", f"{totals.tokens:,}"),
        ("activation rows", f"{totals.activation_rows:,}"),
        ("stages × replicas", f"{m.stages} × {m.replicas} on {m.device}"),
        (
            "time",
            f"{timings.get('seconds', float('nan')):.1f} s ({timings.get('tokens_per_s', float('nan')):,.0f} tokens/s)"
            if m.complete
            else "not finished",
        ),
    ]
    summary = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    acc_rows = "\n".join(
        f"<tr><td>{html.escape(by)}</td><td>{html.escape(str(value))}</td><td>{a.correct}/{a.total}</td><td>{a.accuracy:.0%}</td></tr>"
        for by, groups in m.summary.accuracy.items()
        for value, a in groups.items()
    )
    layer_links = " ".join(f'<a class="layer-link" href="layers/{i:02d}.html">{i}</a>' for i in range(run.n_layers))
    flood = blue_flood_line(m)
    notice = f'<p class="notice" id="blue-flood">{html.escape(flood)}</p>' if flood else ""
    partial = partial_line(m)
    marked = (
        f'<p class="notice" id="partial">{html.escape(partial)}. This report shows what it committed; '
        "<code>neuroscan scan ... --resume</code> finishes the scan, then report it again.</p>"
        if partial
        else ""
    )
    body = f"""<h1>neuroscan report{" (partial)" if partial else ""}</h1>
{marked}
<table class="summary">{summary}</table>
{notice}
<div id="legend"></div>
<h2>Layers</h2>
<p class="layers">{layer_links}</p>
<figure><img src="plots/kept-per-layer.png" alt="selected and kept neurons per layer"><figcaption>Neurons per prompt that cross a threshold (selected) and that are kept (the cap), median and 25–75 % of prompts.</figcaption></figure>
<figure><img src="plots/coverage-by-depth.png" alt="red and blue coverage by depth"><figcaption>For each prompt and layer, the mean over kept neurons of the fraction of the prompt's tokens that are red (or blue): scattered firing reads low, whole-prompt firing high.</figcaption></figure>
{_verification(m)}
<h2>Accuracy (teacher-forced)</h2>
<table class="accuracy"><thead><tr><th>by</th><th>group</th><th>correct</th><th>accuracy</th></tr></thead><tbody>{acc_rows or '<tr><td colspan="4">no prompt has an expected answer</td></tr>'}</tbody></table>"""
    return _page("report (partial)" if partial else "report", "index", body, root="")


FAILED_ROW = ' class="failed"'


def _verification(m: Manifest) -> str:
    """The fidelity check (``--verify``): its line, and its figures per layer folded away."""
    line = verification_line(m)
    if line is None:
        return ""
    v = m.verification
    failed = set(v.failed())
    rows = "".join(
        f"<tr{FAILED_ROW if int(layer) in failed else ''}><td>{layer}</td><td>{c.pairs:,}</td>"
        f"<td>{c.kept_agreement:.1%}</td><td>{c.selected:,} / {c.selected_fp32:,}</td><td>{c.flips:,}</td>"
        f"<td>{c.max_diff:.3g}</td><td>{c.min_diff:.3g}</td><td>{c.off:,}</td></tr>"
        for layer, c in v.layers.items()
    )
    return f"""<h2>Fidelity check</h2>
<p class="{"check" if v.passed else "notice"}" id="verification">{html.escape(line)}</p>
<details><summary>per layer (prompts {", ".join(map(str, v.prompts))})</summary>
<table class="verification"><thead><tr><th>layer</th><th>pairs</th><th>kept by both</th><th>selected (scan / float32)</th><th>flips</th><th>largest |max_act| diff</th><th>largest |min_act| diff</th><th>past the tolerance</th></tr></thead>
<tbody>{rows}</tbody></table></details>"""
