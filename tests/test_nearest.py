"""nearest_reference: every backend against the dense reference, which is checked by brute force."""
import math

import pytest
import torch

from rlr_fast import nearest
from rlr_fast.ops import nearest_reference

BACKENDS = ["reference", "torch"]


def brute_force(x, ref):
    """Loops over tokens in float64 with Python's max: first index among equals."""
    b, n, _ = x.shape
    index = torch.empty(b, n, dtype=torch.int64)
    sim = torch.empty(b, n, dtype=torch.float64)
    for i in range(b):
        r = ref if ref.dim() == 2 else ref[i]
        for t in range(n):
            best, arg = -math.inf, 0
            for j in range(r.shape[0]):
                u, w = x[i, t].double(), r[j].double()
                c = float(u @ w) / (max(float(u.norm()), 1e-12) * max(float(w.norm()), 1e-12))
                if c > best:
                    best, arg = c, j
            index[i, t], sim[i, t] = arg, best
    return index, sim


def agree(x, ref, index, sim, oracle_index, oracle_sim, atol):
    """Indices equal, except where two reference tokens are within rounding of each other."""
    assert index.dtype == torch.int64 and index.shape == x.shape[:2]
    torch.testing.assert_close(sim.double(), oracle_sim.double(), atol=atol, rtol=0)
    differ = index != oracle_index
    if differ.any():  # a near-tie: the chosen token's true similarity must equal the best one's
        xn = torch.nn.functional.normalize(x.double(), dim=-1)
        rn = torch.nn.functional.normalize(ref.double(), dim=-1)
        r = rn.expand(x.shape[0], *rn.shape[-2:])
        chosen = torch.einsum("bnc,bnc->bn", xn, r.gather(1, index[..., None].expand(-1, -1, x.shape[-1])))
        torch.testing.assert_close(chosen[differ], oracle_sim.double()[differ], atol=atol, rtol=0)
        assert differ.float().mean() < 0.01


def test_reference_matches_brute_force():
    x, ref = torch.randn(2, 9, 5, dtype=torch.float64), torch.randn(13, 5, dtype=torch.float64)
    index, sim = nearest_reference(x, ref, backend="reference")
    bi, bs = brute_force(x, ref)
    assert torch.equal(index, bi)
    torch.testing.assert_close(sim, bs, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                        (torch.float16, 1e-5), (torch.bfloat16, 1e-5)])
def test_backends_agree_with_reference(backend, shared, dtype, atol, monkeypatch):
    monkeypatch.setattr(nearest, "TILE_SCORES", 1000)  # many tiles, M not a multiple of any
    x = torch.randn(3, 150, 24).to(dtype)
    ref = (torch.randn(301, 24) if shared else torch.randn(3, 301, 24)).to(dtype)
    index, sim = nearest_reference(x, ref, backend=backend)
    oi, osim = nearest_reference(x.double(), ref.double(), backend="reference")  # inputs already rounded
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_first_features_are_read_in_place(backend, monkeypatch):
    """x as a (B, C, H*W) feature map seen as (B, N, C): not contiguous, with a shared ref."""
    monkeypatch.setattr(nearest, "TILE_SCORES", 500)
    features = torch.randn(2, 16, 70)
    x = features.transpose(1, 2)
    ref = torch.randn(90, 16)
    index, sim = nearest_reference(x, ref, backend=backend)
    oi, osim = nearest_reference(x.contiguous().double(), ref.double(), backend="reference")
    agree(x, ref, index, sim, oi, osim, 1e-5)
