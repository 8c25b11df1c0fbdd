"""Shared pytest setup."""
import os


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes many seconds (deselect with -m 'not slow')")
    # A model name that is not a local path is looked up on the Hugging Face Hub: in tests that is the
    # fake Hub (tests/fake_hub.py) or this closed loopback port, never the internet.
    os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


def pytest_collection_finish(session):
    """Importing the test modules made ~400k objects (torch, transformers) that live as long as the
    session: out of the garbage collector's sight they go (see `freeze_the_imports`)."""
    freeze_the_imports()


def freeze_the_imports() -> None:
    """Move the objects alive now into the collector's permanent generation: the loader's gc.collect()
    after each model load (loader/memory.py) otherwise walks all of them, most of a second per load
    on a busy 2-core machine. Called when what is alive is modules (imports, lazy ones included),
    not models: a frozen object in a reference cycle is never freed."""
    import gc

    gc.collect()
    gc.freeze()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A function (arch, **config changes) -> folder of a tiny random checkpoint, built once per session."""
    from tiny_models import build

    folders = {}

    def get(arch: str, **changes):
        key = (arch, repr(sorted(changes.items())))
        if key not in folders:
            folders[key] = build(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), **changes)
            freeze_the_imports()  # transformers imports its modeling modules lazily, while building
        return folders[key]

    return get


@pytest.fixture(scope="session")
def tiny_reasoning_model(tmp_path_factory):
    """A function template name -> folder of a tiny random Qwen3 with that real chat template
    (tests/tiny_reasoning.py: "Qwen3-0.6B" or "QwQ-32B"), built once per session."""
    import tiny_reasoning

    folders = {}

    def get(template: str = tiny_reasoning.QWEN3):
        if template not in folders:
            folders[template] = tiny_reasoning.build(tmp_path_factory.mktemp(f"tiny-{template}"), template)
        return folders[template]

    return get


@pytest.fixture(scope="session")
def minilm():
    """The packaged all-MiniLM-L6-v2 (`make test` installs it), loaded once per session."""
    from levante import LLM

    return LLM("all-minilm:l6-v2", dtype="float32")


@pytest.fixture(scope="session")
def default_llm():
    """The default model (qwen2.5-coder:0.5b, packed Q4_K) as `levante serve` runs it, loaded once per
    session for the tests that need a real model's answers (tool calls, MCP, structured output, the
    web page and the TUI). Each server the tests start on it stops its engine loop when it closes;
    the model stays usable for the next."""
    from levante import LLM

    return LLM(max_model_len=4096)


def pytest_terminal_summary(terminalreporter):
    """One line per class of skipped test, with its reason and count, so that a green run says what it
    did not test on this machine (no AVX-512 variant, no CUDA, no Chromium, ...). Runs in the xdist
    controller too: the workers' reports carry their reasons."""
    classes: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        classes[skip_reason(report)] = classes.get(skip_reason(report), 0) + 1
    if not classes:
        return
    terminalreporter.section("what this run did not test", sep="-")
    for reason, count in sorted(classes.items(), key=lambda item: (-item[1], item[0])):
        terminalreporter.line(f"{count:5d} skipped: {reason}")


def skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ").strip() or "no reason given"
