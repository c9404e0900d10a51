"""report: one self-contained HTML page and a Markdown twin from experiment, analyze and locate runs."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from helpers_report import SECRET_COMPLETION, locate_result, make_experiment, write
from PIL import Image

from safety_layers.analysis.run import AnalyzeConfig, analyze
from safety_layers.core.errors import SafetyLayersError
from safety_layers.report import PNG_MAGIC, ReportConfig, detect, fmt, report, write_report


class Page(HTMLParser):
    """Tags and attributes of a page: images, links, scripts, section ids and table rows."""

    def __init__(self, text: str):
        super().__init__()
        self.imgs, self.refs, self.scripts, self.sections, self.rows = [], [], [], [], []
        self._row = None
        self._cell = None
        self._classes = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href", "action", "data", "poster"):
            if a.get(key):
                self.refs.append(a[key])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        elif tag == "script":
            self.scripts.append(a)
        elif tag == "section":
            self.sections.append(a.get("id"))
        elif tag == "tr":
            self._row, self._classes = [], a.get("class", "")
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append((self._row, self._classes))
            self._row = None

    def row(self, first: str, *more: str) -> tuple[list[str], str]:
        """The first table row starting with these cells."""
        key = [first, *more]
        for cells, cls in self.rows:
            if cells[: len(key)] == key:
                return cells, cls
        raise AssertionError(f"no table row starting with {key}")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    im = Image.open(io.BytesIO(data))
    im.load()
    return im.size


def check_self_contained(html_text: str) -> Page:
    page = Page(html_text)
    for ref in page.refs:
        assert ref.startswith(("data:image/png;base64,", "#")), ref
    assert not re.search(r"https?://", html_text), "the page names a network address"
    assert not re.search(r"<link\b|@import|url\(", html_text, re.I)
    assert all("src" not in s for s in page.scripts)            # only inline scripts
    for src in page.imgs:
        w, h = png_size(base64.b64decode(src.split(",", 1)[1], validate=True))
        assert w > 50 and h > 50
    return page


@pytest.fixture(scope="module")
def analyze_run(tmp_path_factory):
    """A real analyze run folder of a tiny random model (a few prompts, seconds)."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("analyze")
    res = analyze(AnalyzeConfig(model="tiny", limit=6, pairs=20, bootstrap=10, progress=False),
                  model=tiny_model("llama", layers=6), run_dir=run)
    return run, res


@pytest.fixture(scope="module")
def experiment_report(tmp_path_factory, analyze_run):
    run = make_experiment(tmp_path_factory.mktemp("experiment"), analysis=analyze_run[0])
    return run, write_report(run)


def test_analyze_run_report(analyze_run, tmp_path):
    run = tmp_path / "ana"
    shutil.copytree(analyze_run[0], run)
    res = analyze_run[1]
    out = write_report(run)
    assert (out.kind, out.sections, out.drawn) == ("analyze", ["summary", "analysis", "settings"], [])
    text = Path(out.html).read_text()
    page = check_self_contained(text)
    assert page.sections == out.sections and out.images == len(page.imgs) == 2
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in page.imgs}
    assert embedded == {(run / "analysis.png").read_bytes(), (run / "probe.png").read_bytes()}
    for i in range(res.num_layers):             # the per-layer table holds the run's numbers
        cells, _ = page.row(str(i))
        assert cells[4:7] == [fmt(res.raw.gap_exact[i]), fmt(res.centred.gap_exact[i]), fmt(res.probe_accuracy[i])]
    assert page.row("layers")[0][1] == str(res.num_layers)
    md = Path(out.markdown).read_text()
    assert "](analysis.png)" in md and "](probe.png)" in md
    assert f"| {res.num_layers - 1} | {fmt(res.raw.nn_exact[-1])} |" in md

    # A run whose PNGs are gone: the report draws them from result.json instead.
    (run / "analysis.png").unlink()
    (run / "probe.png").unlink()
    out = write_report(run)
    assert sorted(Path(p).name for p in out.drawn) == ["analysis.png", "probe.png"]
    assert all(Path(p).parent == run / "report-figures" for p in out.drawn)
    assert len(check_self_contained(Path(out.html).read_text()).imgs) == 2
    assert "](report-figures/analysis.png)" in Path(out.markdown).read_text()


def test_experiment_report_holds_every_section_and_number(experiment_report):
    run, out = experiment_report
    assert out.kind == "experiment"
    assert out.sections == ["summary", "analysis", "localization", "results", "drift", "settings"]
    text = Path(out.html).read_text()
    page = check_self_contained(text)
    assert page.sections == out.sections
    # analysis.png + probe.png from the run; sweeps, results and drift drawn from JSON
    assert sorted(Path(p).name for p in out.drawn) == ["drift.png", "results.png", "sweeps.png"]
    assert out.images == len(page.imgs) == 5
    assert page.row("band")[0][1] == "2-5 (from locate)"
    assert page.row("baseline harmful rate")[0][1] == "0.0625 [0.0173, 0.202] (2/32, keyword)"
    assert "normal: harmful_rate before 0.0625; after full 0.438, sppft 0.0938" in text

    cells, cls = page.row("2-5", "21")                         # the found band in the upper sweep
    assert cells == ["2-5", "21", "23", "yes"] and cls == "found"
    assert page.row("2-4")[0] == ["2-4", "14", "–", "no"] and page.row("2-4")[1] != "found"
    assert page.row("1.150", "2.750")[1] == "found"            # chosen alpha
    assert page.row("proxy vs generation Spearman")[0][1] == "rho 0.812 (n=5)"
    assert page.row("scaled down (should rise)")[0] == ["scaled down (should rise)", "0.850", "0.438"]
    assert "sanity check on malicious: passed" in text

    assert page.row("normal", "full", "2e-05", "2", "0.0625")[0][5:] == ["0.438", "[0.312, 0.562]", "+0.375"]
    assert page.row("normal", "sppft", "2e-05", "2", "0.275")[0][5:] == ["0.225", "[0.200, 0.250]", "-0.0500"]
    assert page.row("backdoor", "full", "2e-05", "1 (1 failed)", "0.0625")[0][5:] == ["0.688", "–", "+0.625"]
    assert "interval: 95% Student-t interval of the mean over seeds" in text
    assert "cells: 4 done, 1 failed" in text
    assert page.row("backdoor__sppft__lr2e-05__seed0")[0][-1] == "CUDA out of memory <oom>"
    # SPPFT left the band 2-5 untouched: mean change 0 inside, 0.03 outside
    assert page.row("normal__sppft__lr2e-05__seed0", "0")[0][1:] == ["0", "0.0300", "6", "yes", "0"]
    assert page.row("normal__full__lr2e-05__seed0", "0.0450")[0][1:] == ["0.0450", "0.0300", "6", "no", "2"]
    assert page.row("cell", "mean rel. change in band 2-5")[0][4:] == ["holds", "peak_shift"]   # scalars only
    assert page.row("seeds")[0][1] == "[0, 1]" and page.row("torch")[0][1] == "2.13.0"
    assert SECRET_COMPLETION not in text


def test_markdown_twin_has_the_tables_and_links(experiment_report):
    run, out = experiment_report
    md = Path(out.markdown).read_text()
    assert md.startswith("# safety-layers report: tiny-llama")
    for heading in ("Summary", "Existence analysis", "Localization evidence", "Results", "Drift after fine-tuning",
                    "Settings and versions"):
        assert f"\n## {heading}\n" in md
    assert "| **2-5** | **21** | **23** | **yes** |" in md
    assert "| normal | full | 2e-05 | 2 | 0.0625 | 0.438 | \\[0.312, 0.562\\] | +0.375 |" in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(["analysis/analysis.png", "analysis/probe.png", "report-figures/sweeps.png",
                                    "report-figures/results.png", "report-figures/drift.png"])
    for link in links:
        assert png_size((run / link).read_bytes())
    assert SECRET_COMPLETION not in md


def test_text_from_the_run_is_escaped(tmp_path):
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    run = make_experiment(tmp_path, model=evil, locate=True, drift_=False)
    out = write_report(run)
    text = Path(out.html).read_text()
    assert evil not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert text.count("<script") == 1                          # the report's own image check
    page = check_self_contained(text)
    assert page.row("model")[0][1] == evil                     # shown as text, not markup
    assert "<oom>" not in text and "CUDA out of memory &lt;oom&gt;" in text
    md = Path(out.markdown).read_text()
    assert "<script>" not in md and "&lt;script&gt;" in md


def test_missing_sections_are_left_out(tmp_path):
    run = make_experiment(tmp_path, locate=False, drift_=False)
    out = write_report(run)
    assert out.sections == ["summary", "results", "settings"]
    text = Path(out.html).read_text()
    page = check_self_contained(text)
    assert page.sections == out.sections
    for absent in ("analysis", "localization", "drift"):
        assert f'id="{absent}"' not in text and f'href="#{absent}"' not in text
    assert "safety layers (locate)" not in text and "initial range (analyze)" not in text
    assert [Path(p).name for p in out.drawn] == ["results.png"]
    # without results.json and cells only the summary and the settings remain
    shutil.rmtree(run / "cells")
    (run / "results.json").unlink()
    assert write_report(run).sections == ["summary", "settings"]


def test_drift_pngs_of_the_run_are_reused(tmp_path, analyze_run):
    png = (analyze_run[0] / "probe.png").read_bytes()
    run = make_experiment(tmp_path, locate=False, results_=False, drift_png=png)
    out = write_report(run)
    assert out.sections == ["summary", "results", "drift", "settings"]
    assert out.drawn == []                       # the run's own drift PNG, nothing drawn
    page = check_self_contained(Path(out.html).read_text())
    assert [base64.b64decode(s.split(",", 1)[1]) for s in page.imgs] == [png]
    assert "](drift/weight_change.png)" in Path(out.markdown).read_text()
    # a file that only claims to be a PNG is left out, said so, and the plot drawn from drift.json
    (run / "drift" / "weight_change.png").write_bytes(b"<html>not a png</html>")
    out = write_report(run)
    assert [Path(p).name for p in out.drawn] == ["drift.png"]
    assert out.notes == ["weight_change.png is not a PNG file; left out"]
    assert out.sections[-1] == "notes"
    check_self_contained(Path(out.html).read_text())


def test_standalone_locate_run_and_out_folder(tmp_path):
    run = tmp_path / "loc"
    write(run / "result.json", locate_result())
    write(run / "config.json", {"model": "tiny-llama", "init": "2-5"})
    assert detect(run) == "locate"
    out = report(ReportConfig(run=str(run), out=str(tmp_path / "elsewhere"), title="Locate <run>"))
    assert out.sections == ["summary", "localization", "settings"]
    assert Path(out.html) == tmp_path / "elsewhere" / "report.html"
    text = Path(out.html).read_text()
    page = check_self_contained(text)
    assert "<title>Locate &lt;run&gt;</title>" in text
    assert page.row("safety layers")[0][1] == "2-5" and page.row("refusals of that band")[0][1] == "23"
    assert [Path(p).name for p in out.drawn] == ["sweeps.png"] and len(page.imgs) == 1
    assert "](report-figures/sweeps.png)" in Path(out.markdown).read_text()
    assert not list(run.glob("report*")), "the run folder is left alone when --out points elsewhere"
    # an .html path names the page; the Markdown goes beside it
    out = write_report(run, tmp_path / "pages" / "loc.html")
    assert Path(out.markdown) == tmp_path / "pages" / "loc.md"
    assert "](../elsewhere/" not in Path(out.markdown).read_text()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name], "a temporary file was left behind"


def test_bad_inputs_fail_with_one_line(tmp_path):
    def error(run):
        with pytest.raises(SafetyLayersError) as e:
            write_report(run)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "does not exist" in error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "expected an experiment run folder (experiment.json)" in error(tmp_path / "empty")
    write(tmp_path / "eval" / "result.json", {"model": "m", "harmful": {"rate": 0.1}})
    assert "neither an analyze result" in error(tmp_path / "eval")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "result.json").write_text('{"raw": ')
    assert "not valid JSON" in error(tmp_path / "torn")
    newer = make_experiment(tmp_path / "newer", version=2, locate=False, drift_=False)
    msg = error(newer)
    assert "format version 2" in msg and "reads version 1" in msg and "upgrade safety-layers" in msg
    write(newer / "experiment.json", {"config": {}})
    assert "no integer 'version'" in error(newer)
    broken = make_experiment(tmp_path / "broken", locate=False, drift_=False)
    write(broken / "locate" / "result.json", {"safety_layers": [1, 2], "sweeps": [{"rows": [{"range": 3}]}]})
    assert "missing or malformed fields" in error(broken)


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(chromium() is None, reason="no chromium binary on PATH (Debian: apt-get install -y chromium)")
def test_report_renders_in_a_headless_browser(experiment_report, tmp_path):
    _, out = experiment_report
    url = Path(out.html).resolve().as_uri()
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000"]
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", url], capture_output=True, timeout=60, check=True)
    im = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert im.shape == (2000, 1280)
    assert im.std() > 20 and (im < 200).mean() > 0.02, "the screenshot is blank"
    dom = subprocess.run(flags + ["--virtual-time-budget=5000", "--dump-dom", url], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    assert loaded and total, "the page's load script did not run (blocked by its Content-Security-Policy?)"
    assert int(loaded.group(1)) == int(total.group(1)) == out.images == 5
