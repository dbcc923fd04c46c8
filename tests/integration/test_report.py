"""``neuroscan report`` in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

One scan of a generated corpus with the embedded model, one report; the pages are opened
from ``file://`` as a user would and checked against the tables they show.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from cluster.cli import main
from cluster.driver import run_scan
from neuroscan.config import ReportConfig, ScanConfig
from prompts.generate import generate, write_jsonl
from report.site import build
from tests.conftest import fill
from tests.same_output import files

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    if os.environ.get("NEUROSCAN_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install chromium (CI installs it in .ci/run)")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def scanned(ray_session, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    corpus = tmp / "corpus.jsonl"
    write_jsonl(
        generate(48, families=["days", "arithmetic", "colors", "letters"], variants=["icl", "zero_shot"]), corpus
    )
    out = tmp / "out"
    run_scan(ScanConfig(prompts=str(corpus), out=str(out), stages=2, batch_tokens=2048, quiet=True))
    build(ReportConfig(dir=str(out)))
    return out


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A page that fails the test on any console error or uncaught exception."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    yield page
    page.close()
    assert problems == []


def open_page(page, path: Path, fragment: str = ""):
    page.goto(path.as_uri() + fragment)
    page.wait_for_function("document.body.dataset.ready === 'true'", timeout=15_000)


def table(out: Path, name: str, layer: int | None = None):
    path = out / name if layer is None else out / name / f"layer_{layer:02d}"
    return ds.dataset(path, format="parquet").to_table()


def decode(raw: bytes, n: int) -> np.ndarray:
    codes = np.frombuffer(raw, np.uint8)
    return np.stack([(codes >> (2 * i)) & 3 for i in range(4)], axis=1).reshape(-1)[:n]


def test_index_renders_with_its_plots(scanned, page):
    open_page(page, scanned / "report" / "index.html")
    for img in page.query_selector_all("figure img"):
        assert img.evaluate("i => i.complete && i.naturalWidth > 300")
    assert len(page.query_selector_all("a.layer-link")) == 28
    text = page.inner_text("table.summary")
    assert "embedded:tiny" in text and "48" in text
    assert "family" in page.inner_text("table.accuracy")
    assert len(page.query_selector_all("#legend .swatch")) == 4


def test_a_layer_page_shows_the_strips_of_the_tables_in_all_four_bands(scanned, page):
    prompts = table(scanned, "prompts").sort_by("prompt_id")
    longest = int(np.argmax(prompts["n_tokens"].to_numpy()))
    pid, n = prompts["prompt_id"][longest].as_py(), prompts["n_tokens"][longest].as_py()
    seen = set()
    for layer in (0, 14, 27):
        open_page(page, scanned / "report" / "layers" / f"{layer:02d}.html", f"#p={pid}")
        assert page.get_attribute("#strips", "data-prompt") == str(pid)
        shown = page.eval_on_selector_all(
            ".strip",
            "rows => rows.map(r => [Number(r.dataset.neuron), [...r.querySelectorAll('.tok')].map(t => Number(t.dataset.band))])",
        )
        rows = table(scanned, "activations", layer).to_pandas()
        rows = rows[rows.prompt_id == pid].set_index("neuron")
        assert 0 < len(shown) <= 32
        coverage = [(rows.n_above[nrn] + rows.n_below[nrn]) / n for nrn, _ in shown]
        assert coverage == sorted(coverage, reverse=True)  # widest coverage first
        for neuron, bands in shown:
            assert bands == decode(rows.bands[neuron], n).tolist()  # the page shows the table's codes
            seen |= set(bands)
    assert seen == {0, 1, 2, 3}


def test_the_prompt_selector_changes_the_strips(scanned, page):
    prompts = table(scanned, "prompts").sort_by("prompt_id")
    open_page(page, scanned / "report" / "layers" / "05.html")
    first = page.inner_text("#strips")
    assert page.get_attribute("#strips", "data-prompt") == str(prompts["prompt_id"][0].as_py())
    page.select_option("#prompt", "7")
    page.wait_for_function(f"document.querySelector('#strips').dataset.prompt === '{prompts['prompt_id'][7].as_py()}'")
    strip = page.query_selector(".strip .tokens")
    assert strip.inner_text() == "".join(prompts["tokens"][7].as_py()).replace("\n", "↵")
    assert page.inner_text("#strips") != first
    page.click("#next")
    page.wait_for_function(f"document.querySelector('#strips').dataset.prompt === '{prompts['prompt_id'][8].as_py()}'")


def test_a_neuron_page_lists_its_top_prompts_as_in_the_neurons_table(scanned, page):
    neurons = table(scanned, "neurons").to_pandas()
    pages = sorted((scanned / "report" / "neurons").glob("*.html"))
    assert 0 < len(pages) <= 28 * 20
    for path in pages[:: max(1, len(pages) // 5)]:
        layer, neuron = (int(x) for x in path.stem.split("-"))
        row = neurons[(neurons.layer == layer) & (neurons.neuron == neuron)].iloc[0]
        open_page(page, path)
        listed = page.eval_on_selector_all(
            "#top-prompts tbody tr", "rows => rows.map(r => [Number(r.dataset.prompt), Number(r.dataset.act)])"
        )
        assert [p for p, _ in listed] == list(row.top_prompt_ids)
        acts = [a for _, a in listed]
        assert acts == sorted(acts, reverse=True) and np.allclose(acts, row.top_acts)
        marked = page.eval_on_selector_all(
            "#top-prompts tbody tr",
            "rows => rows.map(r => [...r.querySelectorAll('.tok')].findIndex(t => t.classList.contains('max')))",
        )
        assert marked == list(row.top_pos)
        assert f"max here: {row.top_acts[0]:.3f}" in page.get_attribute("#top-prompts tbody tr .tok.max", "title")
        assert f"kept on {row.n_prompts} prompts, red on {row.n_red}" in page.inner_text(".stats")
        shares = page.eval_on_selector_all("#families tbody tr", "rows => rows.map(r => r.cells[0].innerText)")
        assert shares and set(shares) <= {"days", "arithmetic", "colors", "letters"}


def test_the_palette_switch_recolours_the_bands(scanned, page):
    open_page(page, scanned / "report" / "layers" / "27.html")
    colour = "() => getComputedStyle(document.querySelector('#legend .swatch.b3')).backgroundColor"
    before = page.evaluate(colour)
    page.click("#palette")
    assert page.evaluate(colour) == "rgb(213, 94, 0)" != before  # Okabe-Ito vermillion
    assert page.get_attribute("#palette", "aria-pressed") == "true"
    open_page(page, scanned / "report" / "index.html")  # the choice is remembered
    assert page.evaluate(colour) == "rgb(213, 94, 0)"
    page.click("#palette")
    assert page.evaluate(colour) == before


def test_tokens_show_their_band_on_hover(scanned, page):
    open_page(page, scanned / "report" / "layers" / "27.html")
    title = page.get_attribute(".strip .tok[data-band='1']", "title")
    assert "blue" in title and "act < 0" in title and "position" in title


def test_serve_prints_a_url_that_serves_the_site(scanned):
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "report", str(scanned), "--serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        url = lines[1].split()[1]
        assert url.startswith("http://127.0.0.1:")
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "neuroscan report" in body
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0


def test_report_refuses_what_is_not_a_scan_and_marks_an_unfinished_one(tmp_path, scanned, capsys, page):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no manifest.json" in err
    unfinished = tmp_path / "unfinished"
    shutil.copytree(scanned, unfinished, ignore=shutil.ignore_patterns("report"))
    manifest = (unfinished / "manifest.json").read_text().replace('"status": "complete"', '"status": "running"')
    (unfinished / "manifest.json").write_text(manifest)
    assert main(["report", str(unfinished)]) == 0
    assert "; partial: 48 of 48 prompts committed" in capsys.readouterr().out
    open_page(page, unfinished / "report" / "index.html")
    assert page.inner_text("h1") == "neuroscan report (partial)"
    assert page.inner_text("#partial").startswith("partial: 48 of 48 prompts committed")
    assert main(["report", str(scanned), "--strips", "-1"]) == 2


def test_the_index_shows_the_fidelity_check_and_a_failed_one_as_a_notice(scanned, tmp_path, page, capsys):
    open_page(page, scanned / "report" / "index.html")
    assert page.inner_text("#verification").startswith("fidelity check passed (16 prompts run again alone")
    assert len(page.query_selector_all("table.verification tbody tr")) == 28
    assert not page.query_selector_all("table.verification tr.failed")
    failed = tmp_path / "failed"
    shutil.copytree(scanned, failed, ignore=shutil.ignore_patterns("report"))
    manifest = json.loads((failed / "manifest.json").read_text())
    manifest["verification"]["passed"] = False
    manifest["verification"]["layers"]["9"]["off"] = manifest["verification"]["layers"]["9"]["pairs"]
    (failed / "manifest.json").write_text(json.dumps(manifest))
    assert main(["report", str(failed)]) == 0
    capsys.readouterr()
    open_page(page, failed / "report" / "index.html")
    assert page.get_attribute("#verification", "class") == "notice"
    assert page.inner_text("#verification").startswith("fidelity check FAILED from layer 9 (1 of 28 layers")
    rows = page.query_selector_all("table.verification tr.failed")
    assert [row.query_selector("td").text_content() for row in rows] == ["9"]


def test_strips_zero_shows_every_kept_neuron(scanned, tmp_path, page, monkeypatch, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(scanned, copy, ignore=shutil.ignore_patterns("report"))
    monkeypatch.chdir(tmp_path)  # a relative DIR, as `make demo` gives it
    assert main(["report", "copy", "--strips", "0"]) == 0
    assert (copy / "report" / "index.html").as_uri() in capsys.readouterr().out
    pid = table(copy, "prompts").sort_by("prompt_id")["prompt_id"][3].as_py()
    open_page(page, copy / "report" / "layers" / "10.html", f"#p={pid}")
    rows = table(copy, "activations", 10).to_pandas()
    assert len(page.query_selector_all(".strip")) == (rows.prompt_id == pid).sum() > 32


def test_a_failed_write_keeps_the_earlier_report(scanned, tmp_path, capsys, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(scanned, copy)
    before = (copy / "report" / "index.html").read_text()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("report.plots.coverage_by_depth", full)
    assert main(["report", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "earlier report is intact" in err
    assert (copy / "report" / "index.html").read_text() == before
    assert not (copy / ".report.tmp").exists()


def test_a_full_disk_is_one_line_and_leaves_the_scan_and_its_earlier_report_as_they_were(scanned, tmpfs, capsys):
    """Real tmpfs file systems: the scan and its earlier report on a disk with room for half a
    report, and ``--out`` on a disk too small for one. Each write stops in one line; no file of
    the new report stays, and the scan and its earlier report are as they were."""
    disk = tmpfs("128m")  # the scan and two reports (the earlier one stays until the new one is whole)
    run = disk / "run"
    shutil.copytree(scanned, run)
    before = files(run)
    size = sum(len(data) for data in files(run / "report").values())
    ballast = fill(disk, leave=size // 2)
    assert main(["report", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"neuroscan: error: writing the report to {run / 'report'} failed (No space left on device): fix the disk "
        "(space, permissions), or give another place with --out, and run it again; the earlier report is intact\n"
    )
    assert files(run) == before  # no .report.tmp, no .report.old
    assert sorted(p.name for p in disk.iterdir()) == ["ballast", "run"]

    tiny = tmpfs("64k")
    assert size > 64 << 10
    assert main(["report", str(run), "--out", str(tiny / "site")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"neuroscan: error: writing the report to {tiny / 'site'} failed (No space left on device)")
    assert err.endswith("and run it again; nothing was written\n") and err.count("\n") == 1
    assert list(tiny.iterdir()) == []
    assert main(["report", str(run), "--out", str(tiny)]) == 2  # built beside it, on another disk: refused
    assert capsys.readouterr().err == (
        f"neuroscan: error: --out {tiny} is a mount point: give a directory in it, e.g. --out {tiny / 'report'}\n"
    )
    assert sorted(p.name for p in tiny.parent.iterdir()) == ["disk0", "disk1"]

    ballast.unlink()  # room again: the report is replaced
    assert main(["report", str(run)]) == 0
    assert files(run / "report") == files(scanned / "report")
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in scanned.iterdir())


def test_out_writes_the_same_site_elsewhere_and_only_reads_the_scan(scanned, tmp_path, capsys):
    """A scan on read-only storage (a team's shared results) is reported to a place of one's own."""
    before = files(scanned)
    site = tmp_path / "mine" / "site"
    assert main(["report", str(scanned), "--out", str(site)]) == 0
    assert capsys.readouterr().out == f"wrote {site}/ (open {(site / 'index.html').as_uri()})\n"
    assert files(scanned) == before
    assert files(site) == files(scanned / "report")
    assert main(["report", str(scanned), "--out", str(site)]) == 0  # an earlier report there is replaced
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["report", str(scanned), "--out", str(busy)]) == 2
    assert capsys.readouterr().err.endswith(
        f"--out {busy} is not empty and holds no report: choose a new directory, or an earlier report's\n"
    )
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


HOSTILE = [
    {
        "id": '<img src=x onerror="window.pwned=1">',
        "family": "<b>fam</b>",
        "text": 'a <img src=x onerror="window.pwned=2"> b',
    },
    {
        "id": "q2",
        "family": "</script><script>window.pwned=3</script>",
        "text": "</script><script>window.pwned=4</script> & &amp; done",
    },
    {"id": "<!--<script", "family": "<!--<script", "text": "x <!--<script> y"},  # blanked every neuron page
]


def test_prompt_text_ids_and_families_show_as_text_never_as_markup(ray_session, tmp_path, page):
    """A web-text corpus holds HTML: the report must show it literally and run none of it."""
    import json

    corpus = tmp_path / "hostile.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in HOSTILE))
    out = tmp_path / "out"
    run_scan(ScanConfig(prompts=str(corpus), out=str(out), quiet=True))
    build(ReportConfig(dir=str(out)))
    prompts = table(out, "prompts").sort_by("prompt_id")
    site = out / "report"
    neuron_pages = sorted((site / "neurons").glob("*.html"))
    assert neuron_pages
    for path, fragment in [
        (site / "index.html", ""),
        (site / "layers" / "27.html", "#p=0"),
        (site / "layers" / "27.html", "#p=1"),
        (neuron_pages[0], ""),
    ]:
        open_page(page, path, fragment)
        assert page.evaluate("window.pwned") is None
        assert page.query_selector_all("img:not(figure img)") == []
        assert page.eval_on_selector_all("b:not(.stats b)", "bs => bs.map(b => b.outerHTML)") == [], path
    open_page(page, site / "layers" / "27.html", "#p=1")
    assert page.inner_text(".strip .tokens") == "".join(prompts["tokens"][1].as_py())
    assert HOSTILE[0]["id"] in page.inner_text("#prompt")  # the selector lists the ids as typed
    for path in neuron_pages[:3]:  # their scripts ran: the tables are filled
        open_page(page, path)
        assert page.eval_on_selector_all("#top-prompts tbody tr", "rows => rows.length"), path
        families = page.eval_on_selector_all("#families tbody tr", "rows => rows.map(r => r.cells[0].innerText)")
        assert set(families) <= {row["family"] for row in HOSTILE} and families, path


def test_a_gated_models_report_shows_up_beside_each_neuron(ray_session, tmp_path, corpus, page):
    """A Llama's pages: each strip's label gives up's value at the max and the min, and a
    neuron page an ``up`` column, both as in the activations table."""
    from workers.embedded import preset_config, write_checkpoint

    model = write_checkpoint(preset_config("tiny-llama"), tmp_path / "llama")
    out = tmp_path / "out"
    run_scan(ScanConfig(prompts=str(corpus), out=str(out), model=str(model), quiet=True, verify=0))
    build(ReportConfig(dir=str(out)))
    rows = table(out, "activations", 2).to_pandas()
    pid = int(rows.prompt_id.min())
    open_page(page, out / "report" / "layers" / "02.html", f"#p={pid}")
    labels = page.eval_on_selector_all(
        ".strip", "rows => rows.map(r => [Number(r.dataset.neuron), r.querySelector('.label').title])"
    )
    mine = rows[rows.prompt_id == pid].set_index("neuron")
    assert labels
    for neuron, title in labels:  # "max 4.2 at 7 (up 1.3), min -2.1 at 3 (up -0.8)"
        up_max, up_min = (float(x) for x in re.findall(r"\(up (-?[\d.e+-]+)\)", title))
        assert abs(up_max - mine.up_at_max[neuron]) < 1e-3 and abs(up_min - mine.up_at_min[neuron]) < 1e-3, title
    path = sorted((out / "report" / "neurons").glob("02-*.html"))[0]
    neuron = int(path.stem.split("-")[1])
    open_page(page, path)
    assert page.eval_on_selector_all("#top-prompts thead th", "ths => ths.map(t => t.innerText)")[4] == "up"
    shown = page.eval_on_selector_all(
        "#top-prompts tbody tr",
        "rows => rows.map(r => [Number(r.dataset.prompt), Number(r.querySelector('.up').innerText)])",
    )
    by_prompt = rows[rows.neuron == neuron].set_index("prompt_id")
    assert shown and all(abs(up - by_prompt.up_at_max[p]) < 1e-3 for p, up in shown)
