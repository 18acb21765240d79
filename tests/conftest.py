import pytest
import torch

# The tests use small tensors; on a loaded 2-core machine an OpenMP pool of 2 threads turns each
# elementwise kernel into a spin-wait (measured: 14 ms instead of 15 µs for sqrt of 2048 floats).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
