"""Shared pytest setup."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes many seconds (deselect with -m 'not slow')")


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
