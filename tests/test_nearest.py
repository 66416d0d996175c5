"""nearest_reference: every backend against the dense reference, which is checked by brute force."""

import pytest
import torch

from rlr_fast import nearest
from rlr_fast.ops import nearest_reference

from helpers import agree, agree_l2, brute_force, cdist_oracle

BACKENDS = ["dense", "torch"]
FAST = ["torch"]  # the backends checked against the reference (Triton: test_nearest_triton.py)


def test_reference_matches_brute_force():
    x, ref = torch.randn(2, 9, 5, dtype=torch.float64), torch.randn(13, 5, dtype=torch.float64)
    index, sim = nearest_reference(x, ref, backend="dense")
    bi, bs = brute_force(x, ref)
    assert torch.equal(index, bi)
    torch.testing.assert_close(sim, bs, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 1e-5), (torch.bfloat16, 1e-5)])
def test_reference_in_16_and_32_bits_matches_brute_force(shared, dtype, atol):
    """The oracle itself on rounded inputs and a non-contiguous (channels-first) x, against the
    float64 loops: what the other backends are compared with must be right in every dtype."""
    x = torch.randn(2, 7, 24).to(dtype).transpose(1, 2)  # (B, N=24 tokens, C=7): strided view
    ref = (torch.randn(31, 7) if shared else torch.randn(2, 31, 7)).to(dtype)
    index, sim = nearest_reference(x, ref, backend="dense")
    assert sim.dtype == torch.float32
    bi, bs = brute_force(x, ref)
    agree(x, ref, index, sim, bi, bs, atol)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                        (torch.float16, 1e-5), (torch.bfloat16, 1e-5)])
def test_backends_agree_with_reference(backend, shared, dtype, atol, monkeypatch):
    monkeypatch.setattr(nearest, "TILE_SCORES", 1000)  # many tiles, M not a multiple of any
    x = torch.randn(3, 150, 24).to(dtype)
    ref = (torch.randn(301, 24) if shared else torch.randn(3, 301, 24)).to(dtype)
    index, sim = nearest_reference(x, ref, backend=backend)
    oi, osim = nearest_reference(x.double(), ref.double(), backend="dense")  # inputs already rounded
    assert sim.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    agree(x, ref, index, sim, oi, osim, atol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lowest_index(backend, monkeypatch):
    monkeypatch.setattr(nearest, "TILE_SCORES", 64)
    ref = torch.randn(40, 8)
    ref[33] = ref[6]          # the same direction three times: 6 must win
    ref[20] = 2 * ref[6]
    x = torch.randn(2, 5, 8)
    x[0, 1] = 0.5 * ref[6]
    x[1, 4] = ref[20]
    index, sim = nearest_reference(x, ref, backend=backend)
    assert index[0, 1] == 6 and index[1, 4] == 6
    torch.testing.assert_close(sim[0, 1], torch.tensor(1.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_have_similarity_zero(backend):
    ref = torch.randn(7, 4)
    ref[3] = 0
    x = torch.randn(1, 3, 4)
    x[0, 2] = 0
    index, sim = nearest_reference(x, ref, backend=backend)
    assert index[0, 2] == 0 and sim[0, 2] == 0  # zero against everything: the first index
    assert torch.isfinite(sim).all()


def test_outputs_carry_no_gradient():
    x = torch.randn(1, 4, 3, requires_grad=True)
    for backend in BACKENDS:
        _, sim = nearest_reference(x, torch.randn(5, 3), backend=backend)
        assert not sim.requires_grad


@pytest.mark.parametrize("x,ref,match", [
    (torch.randn(4, 3), torch.randn(5, 3), r"x must have shape \(B, N, C\)"),
    (torch.randn(1, 4, 3), torch.randn(5), r"ref must have shape"),
    (torch.randn(1, 4, 3), torch.randn(5, 2), "channel mismatch"),
    (torch.randn(2, 4, 3), torch.randn(3, 5, 3), "batch mismatch"),
    (torch.randn(1, 4, 3), torch.randn(0, 3), "M = 0"),
    (torch.randn(1, 4, 3), torch.randn(5, 3).double(), "dtype mismatch"),
    (torch.randn(1, 4, 3).int(), torch.randn(5, 3).int(), "dtype"),
    (torch.randn(1, 4, 0), torch.randn(5, 0), "C = 0"),
])
def test_bad_input_is_named(x, ref, match):
    with pytest.raises((ValueError, TypeError), match=match):
        nearest_reference(x, ref, backend="torch")


@pytest.mark.parametrize("backend", FAST)
def test_channels_first_features_are_read_in_place(backend, monkeypatch):
    """x as a (B, C, H*W) feature map seen as (B, N, C): not contiguous, with a shared ref."""
    monkeypatch.setattr(nearest, "TILE_SCORES", 500)
    features = torch.randn(2, 16, 70)
    x = features.transpose(1, 2)
    ref = torch.randn(90, 16)
    index, sim = nearest_reference(x, ref, backend=backend)
    oi, osim = nearest_reference(x.contiguous().double(), ref.double(), backend="dense")
    agree(x, ref, index, sim, oi, osim, 1e-5)


# ------------------------------------------------------------------------------------------------
# metric="l2": the nearest row by Euclidean distance, and that distance
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_matches_cdist_exactly_in_float64(backend):
    x, ref = torch.randn(2, 9, 5, dtype=torch.float64), torch.randn(13, 5, dtype=torch.float64)
    index, dist = nearest_reference(x, ref, metric="l2", backend=backend)
    oi, od, _ = cdist_oracle(x, ref)
    assert torch.equal(index, oi) and dist.dtype == torch.float64
    torch.testing.assert_close(dist, od, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-4),
                                        (torch.float16, 1e-4), (torch.bfloat16, 1e-4)])
def test_l2_backends_agree_with_cdist(backend, shared, dtype, atol, monkeypatch):
    monkeypatch.setattr(nearest, "TILE_SCORES", 1000)  # many tiles, M not a multiple of any
    x = torch.randn(3, 150, 24).to(dtype)
    ref = (torch.randn(301, 24) if shared else torch.randn(3, 301, 24)).to(dtype) * 1.5 + 0.3  # norms differ
    index, dist = nearest_reference(x, ref, metric="l2", backend=backend)
    assert dist.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    agree_l2(x, ref, index, dist, atol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_is_not_cosine(backend):
    """A row in the token's direction but far away loses to a nearer row at an angle."""
    ref = torch.tensor([[10.0, 0.0], [0.9, 0.5]])
    x = torch.tensor([[[1.0, 0.0]]])
    assert nearest_reference(x, ref, backend=backend)[0].item() == 0
    index, dist = nearest_reference(x, ref, metric="l2", backend=backend)
    assert index.item() == 1
    torch.testing.assert_close(dist, torch.tensor([[(0.1 ** 2 + 0.5 ** 2) ** 0.5]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_ties_go_to_the_lowest_index_and_an_exact_match_is_near_zero(backend, monkeypatch):
    monkeypatch.setattr(nearest, "TILE_SCORES", 64)
    ref = torch.randn(40, 8)
    ref[33] = ref[6]          # the same row twice, in different tiles: 6 must win
    ref[20] = ref[6]
    x = torch.randn(2, 5, 8)
    x[0, 1] = ref[6]
    x[1, 4] = ref[33]
    x[1, 2] = ref[39]
    index, dist = nearest_reference(x, ref, metric="l2", backend=backend)
    assert index[0, 1] == 6 and index[1, 4] == 6 and index[1, 2] == 39
    # ||x||^2 - 2 (x.r - ||r||^2/2) cancels to rounding: sqrt of a few fp32 ulps of ||x||^2
    assert dist[0, 1] < 1e-2 and dist[1, 4] < 1e-2 and dist[1, 2] < 1e-2


def test_unknown_metric_is_named():
    with pytest.raises(ValueError, match="unknown metric 'manhattan'; choose one of cosine, l2"):
        nearest_reference(torch.randn(1, 4, 3), torch.randn(5, 3), metric="manhattan")


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("shared", [True, False])
def test_traceable_formulation_agrees(metric, shared, monkeypatch):
    """What runs while a model is traced for export: chunks of the reference rows with a running
    best (chunks of 64 here, so ties and maxima cross chunk borders)."""
    from rlr_fast import traceable

    monkeypatch.setattr(traceable, "NEAREST_CHUNK", 64)
    x = torch.randn(2, 50, 12)
    ref = torch.randn(*(() if shared else (2,)), 200, 12)
    ref[..., 150, :] = ref[..., 10, :]
    x[:, 3] = ref[..., 10, :] * (2.0 if metric == "cosine" else 1.0)
    index, value = traceable.nearest_reference(x, ref, 1e-12, metric)
    oi, ov = nearest_reference(x.double(), ref.double(), metric=metric, backend="dense")
    assert (index[:, 3] == 10).all()
    assert torch.equal(index, oi)
    rest = torch.arange(50) != 3  # token 3 equals row 10: fp32 cancellation leaves sqrt(ulps) in l2
    torch.testing.assert_close(value.double()[:, rest], ov[:, rest], atol=1e-4, rtol=1e-5)
    assert (value[:, 3] - ov[:, 3]).abs().max() < (1e-2 if metric == "l2" else 1e-5)


def test_traced_nearest_matches_eager():
    """Under torch.jit.trace (as the ONNX exporters trace), ops.nearest_reference takes the
    traceable path and records a graph that computes the same for another batch size."""
    ref = torch.randn(100, 6)
    traced = torch.jit.trace(lambda x: nearest_reference(x, ref, metric="l2"), torch.randn(2, 10, 6))
    x = torch.randn(3, 10, 6)
    index, dist = traced(x)
    ei, ed = nearest_reference(x, ref, metric="l2", backend="torch")
    assert torch.equal(index, ei)
    torch.testing.assert_close(dist, ed, atol=1e-4, rtol=1e-5)
