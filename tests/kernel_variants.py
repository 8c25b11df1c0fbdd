"""The native kernel variants a test runs under: every variant built for this machine's
architecture (levante/kernels/isa.py), each one this CPU can execute run in turn, the others
skipped with the reason ("avx512 variant: this CPU lacks avx512f, ..."), so the summary says
which were not tested here. The aarch64 variant on x86 is tested under qemu by
tests/test_kernel_harness.py.

Use: ``pytestmark = pytest.mark.usefixtures("kernel_variant")`` with
``from kernel_variants import kernel_variant  # noqa: F401`` in the test module.
"""
import pytest

from levante.kernels import isa, native


def _params():
    params = []
    for variant in isa.for_machine():
        reason = isa.missing(variant.name)
        marks = [pytest.mark.skip(reason=f"{variant.name} variant: {reason}")] if reason else []
        params.append(pytest.param(variant.name, marks=marks, id=variant.name))
    return params or [pytest.param(None, marks=pytest.mark.skip(reason=f"no native kernel variant for {isa.machine()}"),
                                   id="none")]


@pytest.fixture(params=_params())
def kernel_variant(request):
    """The variant in use for the test (native.use), built first where needed."""
    if not native.enabled_by_env():
        pytest.skip(f"{request.param} variant: native kernels disabled by LEVANTE_NATIVE_KERNELS=0")
    try:
        context = native.use(request.param)
        context.__enter__()
    except OSError as error:
        pytest.skip(f"{request.param} variant: {error}")
    try:
        yield request.param
    finally:
        context.__exit__(None, None, None)
