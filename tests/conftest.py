"""Test session setup.

Without CUDA, the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors. Triton reads the
variable when it is imported (its own helpers are decorated then), so it is set here, before any test
module imports triton. Note: with it set, `backend="auto"` pipelines pick the Triton path too.
Set CKV_NO_INTERPRET=1 to keep it unset (the `interpret` tests then skip).
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and os.environ.get("CKV_NO_INTERPRET") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, with one reason, where CUDA is absent (no per-file skip logic)."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="marked gpu: needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def predictor_weights(tmp_path_factory):
    """Configs with `attention_predictor` read trained weights from the user cache (`ckv train-predictor`);
    tests use a fixed, untrained CNN instead (set CKV_PREDICTOR_WEIGHTS to test real weights)."""
    if os.environ.get("CKV_PREDICTOR_WEIGHTS"):
        yield
        return
    from composable_kv.policies.attention_predictor.predictor import PredictorCNN, save_weights
    with torch.random.fork_rng():
        torch.manual_seed(0)
        path = save_weights(PredictorCNN(), tmp_path_factory.mktemp("predictor") / "untrained.pt")
    os.environ["CKV_PREDICTOR_WEIGHTS"] = str(path)
    yield
    os.environ.pop("CKV_PREDICTOR_WEIGHTS", None)


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / empty_like return NaN (floats) or -777777 (ints) so unwritten outputs show up."""
    orig_empty, orig_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64, torch.int16):
            t.fill_(-777777 if t.dtype != torch.int16 else -7777)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(orig_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(orig_like(*a, **k)))
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core box threads oversubscribe badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_tf32():
    """cuDNN convolutions default to TF32: the CNN's scores would differ between paths and from the CPU."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before
