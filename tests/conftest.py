import os

# With no GPU, the Triton kernels run in Triton's interpreter. The variable is read when the
# kernels are defined, so it is set before anything imports rlr_fast.kernels.
try:
    import torch

    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`make test` runs one worker per core), each worker computes on one thread,
# and so do the processes it starts (CLI runs, torchrun, the AOT compile), so that the workers
# share the cores rather than oversubscribe them. torch is imported by now, so its own thread
# count is set by the call below; the environment reaches the processes the tests start.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_name] = "1"
    try:
        torch.set_num_threads(1)
    except Exception:  # pragma: no cover
        pass

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_warn_once_sets():
    """The library says some things once per process (a backend fallback, bf16 without native
    support); each test starts as a fresh process would, so a test that expects the warning
    gets it whatever ran before."""
    from rlr_fast import ops, precision

    ops._warned.clear()
    precision._warned.clear()
    yield


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The tiny two-class demo data set (brick and gravel, 64 px, 4 training images, 2 good and 4
    defective test images per class) that the CLI, report, robustness, layout, PatchCore and
    engine tests read. Shared by the whole session, so read only: a test that changes a data set
    copies it first."""
    from rlr_fast.demo_data import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("data"), classes=("brick", "gravel"), image_size=64,
                              n_train=4, n_test_good=2, n_test_defect=4)


# The longest file (the AOT compile of every kernel, several minutes) first: with --dist loadfile a
# worker takes it at once while the other works through the rest, instead of starting it late.
LONGEST_FIRST = ("test_kernels_aot.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: the rest keep their order
