import multiprocessing
import os

import pytest

# Inductor compiles in this process, not in a pool of worker processes that every spawned rank
# would start again and that can keep a finished process from exiting. Set before torch reads it.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

# The tests use small tensors; on a loaded 2-core machine an OpenMP pool of 2 threads turns each
# elementwise kernel into a spin-wait (measured: 14 ms instead of 15 µs for sqrt of 2048 floats).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_sessionfinish(session, exitstatus):
    # A test that timed out can leave spawned ranks behind; multiprocessing would wait for them
    # at exit and hold the session open after its result is known.
    for child in multiprocessing.active_children():
        child.kill()
        child.join(5)
