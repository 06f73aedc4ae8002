"""The group report (``group/report.html``) is self-contained and renders in a real browser.

1. Without a browser: the HTML parses, every ``<img>`` is an embedded PNG
   (``data:image/png;base64,...`` whose bytes start with the PNG signature), and nothing
   external is referenced (no ``http://``/``https://``, every ``src``/``href`` is ``data:`` or a
   ``#`` anchor) — the report must open from a USB stick or an e-mail attachment.
2. In headless Chromium (``chromium --headless --dump-dom``): the inline script sets
   ``<body data-images=N data-images-loaded=M>`` after the load event; N == M >= 6 means every
   figure decoded, and the section headings are there.
3. A ``--screenshot``: a valid PNG of the window size that is not blank.

The group output is made from the ROI-table simulator (tests/_group_data.py), so the module
takes a few seconds. The browser tests skip with a reason when no Chromium is installed
(``make system-deps`` installs Debian's ``chromium`` when run as root); set
``DMRIHARMONY_CHROMIUM`` to use another Chromium/Chrome binary.
"""

from __future__ import annotations

import base64
import os
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from _group_data import make_group_input

from dmriharmony.cli.run import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("Sites", "Quality control", "ROI values per site", "Effect of dx",
            "Meta-analysis: forest plots", "Site prediction", "Traveling subjects")
MIN_IMAGES = 6  # site distributions, effect sizes, forest, site prediction, traveling (x2 maps)
BROWSER_TIMEOUT = 120
WINDOW = (1200, 900)


def _chromium() -> str | None:
    env = os.environ.get("DMRIHARMONY_CHROMIUM")
    if env:
        return shutil.which(env) or (env if Path(env).is_file() else None)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    d = make_group_input(root)
    code = main([str(d["bids"]), str(d["out"]), "group", "-w", str(root / "work"),
                 "--harmonizers", "combat,covbat,gam,meta,mixed", "--covariates", "age,sex",
                 "--effect", "dx", "--seed", "7"])
    assert code == 0
    path = d["deriv"] / "group" / "report.html"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def chromium():
    path = _chromium()
    if path is None and os.environ.get("DMRIHARMONY_CHROMIUM"):
        pytest.skip(f"no headless browser: DMRIHARMONY_CHROMIUM="
                    f"{os.environ['DMRIHARMONY_CHROMIUM']} is not an executable")
    if path is None:
        pytest.skip("no headless browser: chromium not on PATH (Debian: apt-get install "
                    "chromium, or `make system-deps` as root; or set DMRIHARMONY_CHROMIUM)")
    return path


def _browser(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with a private profile (parallel runs do not share a lock)."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--no-default-browser-check", "--disable-extensions",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=BROWSER_TIMEOUT,
                              env=dict(os.environ, HOME=str(profile)))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{chromium} did not finish within {BROWSER_TIMEOUT} s: {' '.join(cmd)}")
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stderr.decode(errors='replace')[-3000:]}")
    return proc


class _Collector(HTMLParser):
    """Tags and attributes of a document, the body's attributes and the h1-h3 texts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.body: dict[str, str | None] | None = None
        self.headings: list[tuple[str, str]] = []
        self._heading: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "body":
            self.body = a
        if tag in ("h1", "h2", "h3"):
            self._heading, self._text = tag, []

    def handle_endtag(self, tag):
        if tag == self._heading:
            self.headings.append((tag, " ".join("".join(self._text).split())))
            self._heading = None

    def handle_data(self, data):
        if self._heading:
            self._text.append(data)


def _parse(text: str) -> _Collector:
    p = _Collector()
    p.feed(text)
    p.close()
    return p


def _missing_sections(headings: list[tuple[str, str]]) -> list[str]:
    h2 = [t for tag, t in headings if tag == "h2"]
    return [s for s in SECTIONS if not any(s in t for t in h2)]


def test_report_is_self_contained(report):
    """Pure Python: parses; every image is an embedded PNG; no external reference."""
    text = report.read_text(encoding="utf-8")
    doc = _parse(text)
    assert doc.body is not None, "no <body>"
    assert _missing_sections(doc.headings) == [], doc.headings
    imgs = [a for tag, a in doc.tags if tag == "img"]
    assert len(imgs) >= MIN_IMAGES, f"{len(imgs)} <img>"
    prefix = "data:image/png;base64,"
    for a in imgs:
        src = a.get("src") or ""
        assert src.startswith(prefix), f"<img alt={a.get('alt')!r}> src {src[:60]!r}"
        png = base64.b64decode(src[len(prefix):], validate=True)
        assert png.startswith(PNG_SIGNATURE), f"<img alt={a.get('alt')!r}>: not a PNG"
        assert a.get("alt"), "an <img> without alt text"
    # nothing fetched from anywhere: no URL at all (base64 never contains ':'), and every
    # src/href is embedded data or an anchor in the page
    for scheme in ("http://", "https://", "//cdn", "file://"):
        assert scheme not in text, f"{scheme} referenced"
    for tag, a in doc.tags:
        for attr in ("src", "href"):
            v = (a.get(attr) or "").strip()
            if attr in a:
                assert v.startswith(("data:", "#")), f"<{tag} {attr}={v[:80]!r}>"
    assert not [a for tag, a in doc.tags if tag == "link"], "<link> to an external file"
    assert "url(" not in text.split("</style>")[0], "CSS url(...) in the stylesheet"


def test_report_renders_in_headless_chromium(report, chromium, tmp_path):
    """Every figure decodes in a real browser (the inline load script counts them)."""
    proc = _browser(chromium, tmp_path / "profile", "--dump-dom", report.as_uri())
    dom = proc.stdout.decode("utf-8", errors="replace")
    doc = _parse(dom)
    assert doc.body is not None, f"no <body> in the dumped DOM:\n{dom[:2000]}"
    n, loaded = doc.body.get("data-images"), doc.body.get("data-images-loaded")
    assert n is not None and loaded is not None, (
        f"the report's load script did not run (body attributes {doc.body})")
    assert int(n) == int(loaded) >= MIN_IMAGES, f"{loaded} of {n} images loaded"
    assert _missing_sections(doc.headings) == [], doc.headings


def _png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE), "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_screenshot_is_not_blank(report, chromium, tmp_path):
    import matplotlib.image as mpimg

    shot = tmp_path / "report.png"
    _browser(chromium, tmp_path / "profile", "--hide-scrollbars",
             f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}", report.as_uri())
    assert shot.is_file(), "chromium wrote no screenshot"
    assert _png_size(shot.read_bytes()) == WINDOW
    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0])
    rgb = np.asarray(pixels[..., :3], dtype=float)
    assert rgb.var() > 0, "blank screenshot (one colour)"
    # some ink: the title, tables and first figures (a white page with a stray pixel is blank)
    dark = (rgb.mean(axis=-1) < 0.5).mean()
    assert dark > 0.005, f"only {dark:.2%} dark pixels: nothing rendered?"
