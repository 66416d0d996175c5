"""nearest_reference, per provider, at ResAD's layer-1 shapes: time and peak memory in one run.

Providers: ``torch`` (the chunked backend, the CPU path), ``dense`` (the plain way the issue
compares against: normalise, x @ ref^T, max over the references; it holds the B x N x M scores)
and ``triton`` (the fused kernel, CUDA only). The reference backend is the dense way plus a mask
for exact first-index ties, so ``dense`` is the cheaper of the two to beat.

Full size (``--benchmark``): 8 images of 56 x 56 tokens (224 px, stride 4) against a shared
reference of 4 shots x 56 x 56 tokens, C = 24 (tf_efficientnet_lite0's stride-4 level, the
default backbone's) and 256. Without the flag the same cases run at 8 x 8 tokens, quickly.
"""
import pytest
import torch
import torch.nn.functional as F

from rlr_fast import nearest_reference

BATCH, SHOTS = 8, 4
FULL_SIDE, SMALL_SIDE = 56, 8
PROVIDERS = ["torch", "dense", "triton"]


def _dense(x, ref):
    """The dense way: every (B, N, M) cosine at once, then the best reference per token."""
    sims = F.normalize(x, dim=-1, eps=1e-12) @ F.normalize(ref, dim=-1, eps=1e-12).transpose(-1, -2)
    best, index = sims.max(dim=-1)
    return index, best


@pytest.mark.parametrize("channels", [24, 256])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_nearest(benchmark, measure, device, full, provider, channels):
    if provider == "triton" and device.type != "cuda":
        pytest.skip("triton runs on CUDA (its CPU interpreter checks correctness, not speed)")
    side = FULL_SIDE if full else SMALL_SIDE
    tokens, refs = side * side, SHOTS * side * side
    torch.manual_seed(0)
    x = torch.randn(BATCH, tokens, channels, device=device)
    ref = torch.randn(refs, channels, device=device)
    if provider == "dense":
        call = lambda: _dense(x, ref)  # noqa: E731
    else:
        call = lambda: nearest_reference(x, ref, backend=provider)  # noqa: E731
    index, _ = call()
    expected, _ = nearest_reference(x, ref, backend="torch" if device.type == "cpu" else "dense")
    assert (index == expected).float().mean() > 0.99  # the same problem for every provider

    def fn():
        with torch.no_grad():
            call()

    benchmark.group = f"nearest {side}x{side} tokens x {SHOTS} shots, C {channels}, batch {BATCH}"
    measure(fn, 3 if full else 2, kind="nearest", op="nearest_reference", provider=provider, batch=BATCH,
            tokens=tokens, refs=refs, channels=channels, flops=2 * BATCH * tokens * refs * channels,
            dense_scores_bytes=4 * BATCH * tokens * refs)
