"""Test configuration: environment before CUDA starts, devices, hypothesis profiles.

Every test that takes the `device` fixture runs on the CPU (Triton interpreter, cooperative host
streams) and, where CUDA exists, on the GPU (compiled kernels, stream memory operations).
Profiles: `ci` (CPU budget; default without CUDA) and `device` (more examples; default with CUDA);
override with `--hypothesis-profile`.
"""

from a2a import envs

envs.set_simulation_env()  # before torch initialises CUDA: N simulated ranks share one GPU

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

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

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
