"""The web chat's weight and its time to first token, against the API on the same request.

    python benchmarks/webui.py [-m MODEL] [--rounds 5]

Serves MODEL (default: the packaged default model) with the page, opens it in Debian's Chromium
(Playwright), and reports:
- the bytes the page loads (every file it fetches), as sent gzipped and as they are;
- time to first token of one request, sent by the page (Enter pressed -> first answer text on
  screen) and by a plain HTTP client (request sent -> first content delta), alternating which goes
  first, with prefix caching off so that neither reuses the other's prompt.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from browser import ARGS, CHROMIUM  # noqa: E402
from live_server import live_server  # noqa: E402

QUESTIONS = ["Write a haiku about CPUs.", "Name three prime numbers.", "What is a linked list?",
             "Say hello in French.", "Explain recursion in one sentence.", "What is 12 squared?",
             "Give a Python one-liner that reverses a string.", "What is the capital of Spain?"]


def page_weight(page, base: str) -> tuple[int, int, list[str]]:
    """(gzipped bytes, plain bytes, files) of everything the page fetched."""
    files = page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    files = [base + "/"] + [f for f in files if f.startswith(base)]
    zipped = plain = 0
    for url in files:
        with httpx.stream("GET", url, headers={"Accept-Encoding": "gzip"}) as response:
            response.read()
            zipped += response.num_bytes_downloaded
        with httpx.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response:
            response.read()
            plain += response.num_bytes_downloaded
    return zipped, plain, files


def page_ttft(page, question: str) -> tuple[float, dict]:
    """Milliseconds from pressing Enter to the first answer text on screen, and the request the page sent."""
    page.fill("#prompt", question)
    page.evaluate("""() => {
        window.__first = null;
        const box = document.getElementById('messages');
        const observer = new MutationObserver(() => {
            const answer = [...box.querySelectorAll('.message.assistant .bubble')].pop();
            if (answer && answer.textContent.trim() && window.__first === null) {
                window.__first = performance.now(); observer.disconnect();
            }
        });
        observer.observe(box, {subtree: true, childList: true, characterData: true});
        document.getElementById('prompt').addEventListener('keydown', () => { window.__pressed = performance.now(); },
                                                           {once: true, capture: true});
    }""")
    with page.expect_request("**/v1/chat/completions") as request:
        page.press("#prompt", "Enter")
    page.wait_for_selector("body:not(.busy):not([data-saving]) .message.assistant:last-child .actions .copy",
                           timeout=600_000)
    return page.evaluate("window.__first - window.__pressed"), request.value.post_data_json


def api_ttft(base: str, body: dict) -> float:
    started, first = time.perf_counter(), None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            compact = line.replace(" ", "")
            if first is None and '"content":"' in compact and '"content":""' not in compact:
                first = time.perf_counter()
    return (first - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from levante import LLM
    from levante.loader.sources import DEFAULT_MODEL
    from levante.serve.webui import WebUI
    import tempfile

    name = args.model or DEFAULT_MODEL
    llm = LLM(name, enable_prefix_caching=False, max_model_len=2048)
    with tempfile.TemporaryDirectory() as folder, \
            live_server(llm, name, webui=WebUI(store_path=Path(folder) / "chats.sqlite3")) as (base, _), \
            sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.goto(base + "/")
        page.wait_for_selector("body[data-ready=true]")
        zipped, plain, files = page_weight(page, base)
        print(f"page weight: {zipped} bytes gzipped, {plain} bytes plain, {len(files)} files")
        page.click("#settings-button")
        page.fill("#settings-form [name=temperature]", "0")
        page.fill("#settings-form [name=max_tokens]", str(args.max_tokens))
        page.click("#settings-save")
        in_page, by_api = [], []
        for round_ in range(args.rounds):
            question = QUESTIONS[round_ % len(QUESTIONS)] + f" ({round_})"
            page.click("#new-chat")
            if round_ % 2:  # the API first: the page's request is then the same, not the warmer
                body = {"model": name, "messages": [{"role": "user", "content": question}], "temperature": 0,
                        "top_p": 0.9, "max_tokens": args.max_tokens, "stream": True,
                        "stream_options": {"include_usage": True}}
                by_api.append(api_ttft(base, body))
                ms, sent = page_ttft(page, question)
                assert sent == body, (sent, body)
                in_page.append(ms)
            else:
                ms, body = page_ttft(page, question)
                in_page.append(ms)
                by_api.append(api_ttft(base, body))
            print(f"round {round_}: page {in_page[-1]:.0f} ms, API {by_api[-1]:.0f} ms")
        page_median, api_median = statistics.median(in_page), statistics.median(by_api)
        print(f"time to first token, median of {args.rounds}: page {page_median:.0f} ms (Enter -> text on screen), "
              f"API {api_median:.0f} ms (request -> first delta); page/API {page_median / api_median:.2f}")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
