"""The exporters' formulation of the ops (rlr_fast.traceable) against the dense reference, and
the dispatch to it while tracing."""
import pytest
import torch

from rlr_fast import dense, ops, traceable


@pytest.mark.parametrize("grid,window", [((6, 5), (3, 3)), ((4, 7), (5, 3)), ((3, 3), (7, 7)), ((1, 6), (1, 5))])
@pytest.mark.parametrize("k_shared,v_shared", [(True, True), (False, False), (True, False)])
def test_local_cross_attention_matches_the_reference(grid, window, k_shared, v_shared):
    b, h, d, length = 2, 3, 4, grid[0] * grid[1]
    q = torch.randn(b, h, length, d, dtype=torch.float64)
    k = torch.randn(*(() if k_shared else (b,)), h, length, d, dtype=torch.float64)
    v = torch.randn(*(() if v_shared else (b,)), h, length, d, dtype=torch.float64)
    got = traceable.local_cross_attention(q, k, v, grid, window, 0.7)
    torch.testing.assert_close(got, dense.local_cross_attention(q, k, v, grid, window, 0.7))


def test_tracing_dispatches_to_the_traceable_formulation():
    q, k, v = torch.randn(2, 2, 30, 8), torch.randn(2, 30, 8), torch.randn(2, 2, 30, 8)
    for op in ("local_cross_attention", "neighbor_masked_attention"):
        fn = lambda q, k, v: getattr(ops, op)(q, k, v, (6, 5), 3, backend="torch")
        traced = torch.jit.trace(fn, (q, k, v), check_trace=False)
        names = {node.kind() for node in traced.graph.nodes()}
        assert "prim::PythonOp" not in names  # no autograd.Function in the graph: exporters can read it
        q2 = torch.randn(3, 2, 30, 8)
        v2 = torch.randn(3, 2, 30, 8)
        torch.testing.assert_close(traced(q2, k, v2), fn(q2, k, v2), rtol=1e-5, atol=1e-6)
