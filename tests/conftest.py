"""Test configuration: environment before CUDA starts, devices, hypothesis profiles.

Every test that takes the `device` fixture runs on the GPU where CUDA exists (compiled kernels,
barriers inside the kernels), else on the CPU (Triton interpreter, cooperative host streams).
Profiles: `ci` (CPU budget; default without CUDA) and `device` (more examples; default with CUDA);
override with `--hypothesis-profile`.
"""

from a2a import envs

envs.set_simulation_env()  # before torch initialises CUDA: N simulated ranks share one GPU

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# One process either compiles Triton kernels for CUDA or interprets them on the CPU (decided when
# a2a is imported): CPU-tensor kernel tests run where the interpreter is on (CI), CUDA ones elsewhere.
INTERPRETING = envs.use_triton_interpreter()

settings.register_profile(
    "ci",
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "device",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.load_profile("device" if HAS_CUDA else "ci")

DEVICES = ["cpu"] if INTERPRETING else ["cuda"]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


requires_cuda = pytest.mark.skipif(INTERPRETING, reason="needs a CUDA device (kernels compiled, not interpreted)")
def _interpreter_can_run() -> bool:
    # Triton's interpreter converts 1-element arrays to scalars, which NumPy 2.4 stopped allowing.
    import numpy

    return numpy.lib.NumpyVersion(numpy.__version__) < "2.4.0"


# For tests whose child processes run the kernels under the interpreter (CPU workers), also on a
# GPU machine: they need a NumPy the interpreter works with (pinned in pyproject; not on every image).
requires_interpreter_in_children = pytest.mark.skipif(
    not _interpreter_can_run(), reason="Triton's interpreter needs numpy < 2.4 in this environment"
)
requires_interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="runs kernels on CPU tensors: needs the Triton interpreter (TRITON_INTERPRET=1)"
)
