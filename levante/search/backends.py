"""Search backends and page fetching.

The backend the operator configures is trusted (it is asked directly); the pages its results
link to are not, and are fetched through levante/net's fetcher under the server's policy.

A backend is any callable `(query, max_results) -> list[SearchResult]`. The one
we ship speaks SearxNG's JSON API (`GET /search?q=...&format=json`; the instance
must list `json` in `search.formats`). A plain Python function returning dicts
with `title`, `url` and `snippet` (or `content`) works too.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from levante.errors import LevanteError
from levante.net import FetchPolicy
from levante.search.html_text import html_to_text

USER_AGENT = "levante-web-search/0.1"


@dataclass
class SearchResult:
    title: str
    url: str
    snippet: str = ""
    text: str = ""  # the page's own text, once fetched


class SearchFailed(LevanteError):
    """The search backend could not be reached or answered nonsense."""


SearchBackend = Callable[[str, int], list[SearchResult]]


class SearxngBackend:
    def __init__(self, url: str, timeout: float = 10.0):
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/search") else base + "/search"
        self.timeout = timeout

    def __call__(self, query: str, max_results: int) -> list[SearchResult]:
        import httpx  # here, not at start-up: a server without --search-url never needs it

        try:
            response = httpx.get(self.endpoint, params={"q": query, "format": "json"}, timeout=self.timeout,
                                 headers={"User-Agent": USER_AGENT}, follow_redirects=True)
            response.raise_for_status()
            items = response.json().get("results", [])
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            raise SearchFailed(f"SearxNG at {self.endpoint}: {type(e).__name__}: {e}") from None
        return _results(items)[:max_results]

    def __repr__(self) -> str:
        return f"SearxngBackend({self.endpoint!r})"


def as_backend(backend: str | SearchBackend) -> SearchBackend:
    """A SearxNG URL, or a callable whose results may be dicts or `SearchResult`s."""
    if isinstance(backend, str):
        return SearxngBackend(backend)

    def call(query: str, max_results: int) -> list[SearchResult]:
        return _results(backend(query, max_results))[:max_results]

    return call


def _results(items: Iterable) -> list[SearchResult]:
    results = []
    for item in items:
        if isinstance(item, SearchResult):
            results.append(item)
        elif isinstance(item, dict) and item.get("url"):
            snippet = item.get("snippet") or item.get("content") or ""
            results.append(SearchResult(str(item.get("title") or item["url"]), str(item["url"]), str(snippet),
                                        str(item.get("text") or "")))
    return results


def fetch_pages(results: list[SearchResult], policy: FetchPolicy, timeout: float = 5.0,
                max_bytes: int = 2_000_000) -> None:
    """Fill in each result's `text` from its page, in parallel; a page that fails keeps its snippet only.
    Result URLs are untrusted (a search engine indexes anything): they go through the fetcher."""
    todo = [r for r in results if not r.text and r.url.startswith(("http://", "https://"))]
    if not todo:
        return
    with ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:
        for result, text in zip(todo, pool.map(lambda r: _page_text(r.url, policy, timeout, max_bytes), todo)):
            result.text = text


PAGE_TYPES = ("text/html", "text/plain", "application/xhtml")


def _page_text(url: str, policy: FetchPolicy, timeout: float, max_bytes: int) -> str:
    from levante.net.fetch import FetchFailed, FetchRefused, fetch

    try:
        page = fetch(url, policy, max_bytes=max_bytes, timeout=timeout, accept=PAGE_TYPES)
        text = page.body.decode(page.charset or "utf-8", errors="replace")
    except (FetchRefused, FetchFailed, LookupError):
        return ""
    return text if page.content_type == "text/plain" else html_to_text(text)
