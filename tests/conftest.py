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
def minilm():
    """The packaged all-MiniLM-L6-v2 (`make test` installs it), loaded once per session."""
    from levante import LLM

    return LLM("all-minilm:l6-v2", dtype="float32")
