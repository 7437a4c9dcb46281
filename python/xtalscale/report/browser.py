"""Open a report in headless Chromium: did every plot render, with no JavaScript error?

Used by the tests and by ``bench/report_screenshot.py``; needs a ``chromium`` (or
``chromium-browser`` / ``google-chrome``) executable. The report template records its state in
a hidden ``#render-status`` element (plots expected and rendered, errors caught by
``window.onerror`` or a rejected ``Plotly.newPlot``), which is read back from the DOM that
Chromium dumps after the page has run.
"""
from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RenderResult", "find_chromium", "render_in_browser", "screenshot"]

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable, or None."""
    for name in _BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _command(browser: str, profile: str, *extra: str) -> list[str]:
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
            "--virtual-time-budget=30000", *extra]


@dataclass
class RenderResult:
    """What the page reported after running in the browser."""

    status: str  #: "ok", "error" or "pending" (never finished)
    expected: int  #: plots in the report
    rendered: int  #: plots Plotly finished drawing
    errors: str  #: JavaScript errors, " | "-separated
    plots_without_svg: list = field(default_factory=list)  #: plot divs with no drawing

    @property
    def ok(self) -> bool:
        return (self.status == "ok" and self.rendered == self.expected and not self.errors
                and not self.plots_without_svg)


class _DomScan(html.parser.HTMLParser):
    """Finds #render-status and, per plot div, whether Plotly drew an SVG inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.status: dict = {}
        self.plots: dict = {}
        self._stack: list = []  # ids of the open plot divs

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if a.get("id") == "render-status":
            self.status = a
        classes = (a.get("class") or "").split()
        if tag == "div":
            if "plot" in classes and a.get("id"):
                self.plots.setdefault(a["id"], False)
                self._stack.append(a["id"])
            elif self._stack:
                self._stack.append(None)
        if tag == "svg" and "main-svg" in classes:
            for plot_id in self._stack:
                if plot_id:
                    self.plots[plot_id] = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self._stack:
            self._stack.pop()


def render_in_browser(path: Any, timeout: float = 120.0) -> RenderResult:
    """Load the report in headless Chromium and read back its render status.

    Raises
    ------
    FileNotFoundError
        If no Chromium executable is installed.
    RuntimeError
        If the browser fails to produce a DOM.
    """
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("no chromium executable found (apt-get install chromium)")
    url = Path(path).resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(_command(browser, profile, "--dump-dom", url),
                              capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0 or "<html" not in done.stdout:
        raise RuntimeError(f"chromium failed (exit {done.returncode}): {done.stderr[-2000:]}")
    scan = _DomScan()
    scan.feed(done.stdout)
    s = scan.status
    return RenderResult(s.get("data-status", "missing"), int(s.get("data-expected", -1)),
                        int(s.get("data-rendered", 0)), s.get("data-errors", ""),
                        sorted(k for k, drawn in scan.plots.items() if not drawn))


def screenshot(path: Any, png: Any, width: int = 1280, height: int = 4200,
               timeout: float = 120.0) -> str:
    """Save a PNG of the report as headless Chromium draws it; returns the PNG path."""
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("no chromium executable found (apt-get install chromium)")
    png = os.path.abspath(os.fspath(png))
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(_command(browser, profile, f"--window-size={width},{height}",
                                       f"--screenshot={png}", Path(path).resolve().as_uri()),
                              capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0 or not os.path.isfile(png):
        raise RuntimeError(f"chromium screenshot failed (exit {done.returncode}): "
                           f"{done.stderr[-2000:]}")
    return png
