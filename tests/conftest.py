"""Shared test set-up: one thread per test process (CI machines have 2 cores) and quiet warnings."""

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_trained_mlp():
    """A small MLP trained for 300 steps on the built-in MNIST sample, and 24 test images:
    ``(model, dataset info, x (24, 1, 28, 28), y (24,))``. Many of its images certify at small
    radii, which the soundness tests of patches and geometric threats need."""
    from cure_lirpa.data import dataset_info, load_dataset, stack, take
    from cure_lirpa.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    info = dataset_info("sample")
    x_tr, y_tr = stack(load_dataset("sample", "train"))
    x_te, y_te = stack(take(load_dataset("sample", "test"), 0, 24))
    torch.manual_seed(0)
    model = build_model("mlp", info.in_shape, 10, info.mean, info.std, width=32, depth=1)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        idx = torch.randint(len(x_tr), (64,))
        loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval(), info, x_te, y_te
