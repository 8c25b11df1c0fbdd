"""Headless Chromium (Debian's package) driven by Playwright (PyPI), for the web chat tests.

Playwright's own browser download cannot be reached here, so it launches /usr/bin/chromium
(`make test` installs it with apt). Where Chromium or Playwright is missing the tests skip, saying
so. Each page records its console errors, uncaught exceptions and every request to another origin
(the page must need no network); `Tab.check()` fails a test on any of them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LEVANTE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def launch(playwright):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (make test installs Debian's chromium with apt, as root)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)


class Tab:
    """One page of a fresh browser context (its own localStorage), on the server at `base`."""

    def __init__(self, browser, base: str, shots: Path, viewport=(1100, 760), **context):
        self.base, self.shots = base, shots
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]},
                                           accept_downloads=True, **context)
        self.page = page = self.context.new_page()
        self.problems: list[str] = []
        self.offsite: list[str] = []
        page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}")
                if m.type == "error" and not self._expected(m.text) else None)
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.route("**/*", self._route)
        self.expected_errors: list[str] = []  # console errors a test provokes on purpose (e.g. 401, 400)

    def _expected(self, text: str) -> bool:
        return any(part in text for part in self.expected_errors)

    def _route(self, route):
        if route.request.url.startswith(self.base):
            route.continue_()
        else:  # nothing may leave for another origin (no CDN, no tracking image)
            self.offsite.append(route.request.url)
            route.abort()

    def open(self, path: str = "/", ready: bool = True):
        self.page.goto(self.base + path)
        if ready:
            self.page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        return self.page

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=path, full_page=False)
        return path

    def check(self) -> None:
        assert not self.offsite, f"requests to other origins: {self.offsite}"
        assert not self.problems, "\n".join(self.problems)

    def close(self) -> None:
        self.context.close()
