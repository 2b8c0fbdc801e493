"""Shared test set-up: the repository on sys.path (tests import ``benchmarks``), one thread per test
process (CI machines have 2 cores), and the small trained model several test files certify."""

import contextlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the `benchmarks` package, also when pytest runs from elsewhere
    sys.path.insert(0, str(REPO))


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread inside the block (tiny models: more threads only add
    contention on the shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One thread also while a module's module-scoped fixtures train (use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread_per_module")``)."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def small_trained_mlp():
    """A small MLP trained for 300 steps on the built-in MNIST sample, and 24 test images:
    ``(model, dataset info, x (24, 1, 28, 28), y (24,))``. Many of its images certify at small
    radii, which the soundness tests of patches and geometric threats need."""
    from cure_lirpa.data import dataset_info, load_dataset, stack, take
    from cure_lirpa.models import build_model

    with one_thread():
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
    return model.eval(), info, x_te, y_te


@pytest.fixture(scope="module")
def mlp_checkpoint(small_trained_mlp, tmp_path_factory):
    """:func:`small_trained_mlp` saved as a checkpoint (an ``mlp`` of width 32, depth 1)."""
    from cure_lirpa.io.checkpoint import atomic_torch_save, make_checkpoint

    model, info, _, _ = small_trained_mlp
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    arch_kwargs = {"width": 32, "depth": 1}
    atomic_torch_save(make_checkpoint(model, "mlp", info, {"method": "natural"}, arch_kwargs), path)
    return path
