"""The group report in a real browser: headless Chromium renders report.html with every figure.

Skipped with a reason when Debian's ``chromium`` is not installed (``make test`` installs it
when it runs as root with apt; see the Makefile's ``system-deps``).
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from _group_data import make_group_input

from dmriharmony.cli.run import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECTIONS = ("Sites", "Quality control per run", "ROI values per site", "Effect of dx",
            "Meta-analysis: forest plots", "Site prediction", "Traveling subjects")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    d = make_group_input(root, n_per_site=15)
    assert main([str(d["bids"]), str(d["out"]), "group", "-w", str(root / "work"),
                 "--harmonizers", "combat,covbat,gam,meta,mixed"]) == 0
    return d["deriv"] / "group" / "report.html"


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.links = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        for key in ("href", "src"):
            if a.get(key, "").startswith(("http:", "https:", "//")):
                self.links.append(a[key])


def test_report_is_self_contained_html(report):
    text = report.read_text()
    parser = _Images()
    parser.feed(text)
    assert len(parser.srcs) >= 6
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert parser.links == []
    for s in SECTIONS:
        assert s in text, s


def _chromium(*args, timeout=120):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (make system-deps)")
def test_report_renders_every_figure_in_chromium(report, tmp_path):
    res = _chromium("--virtual-time-budget=5000", "--dump-dom", report.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    body = re.search(r"<body[^>]*>", res.stdout).group(0)
    n = int(re.search(r'data-images="(\d+)"', body).group(1))
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    assert n >= 6 and loaded == n, body
    shot = tmp_path / "shot.png"
    res = _chromium("--window-size=1200,1600", f"--screenshot={shot}", report.as_uri())
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[:2] == (1600, 1200)
    assert img[..., :3].std() > 0.05  # not a blank page
