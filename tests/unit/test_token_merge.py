"""Redux token merging (automerge), corrected: runs of similar tokens → their mean, every run kept, batch-safe."""

from __future__ import annotations

import pytest
import torch

from lib_imgcond.common.errors import ArgumentError
from lib_imgcond.redux.token_merge import automerge, merge_runs, merged_count


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def original_automerge(tokens: torch.Tensor, threshold: float) -> torch.Tensor:
    """ComfyUI_AdvancedReduxControl's helper, as described in seeds-algorithms.md §2.4 (for contrast only)."""
    out = []
    for row in tokens:
        emitted, run, last = [row[0]], [row[0]], row[0]
        for tok in row[1:]:
            if float(tok @ last / torch.sqrt((tok @ tok) * (last @ last))) >= threshold:
                run.append(tok)
                last = torch.stack(run).mean(0)
            else:
                emitted.append(last)
                run, last = [], tok
        out.append(torch.stack(emitted))
    return torch.stack(out)  # crashes when the rows merged to different lengths


def test_runs_become_their_means_and_the_last_run_is_kept():
    a, b, c = rand(3, 8, seed=1)
    row = torch.stack([a, 2 * a, a + 1e-4, b, 3 * b, c])  # runs: a×3, b×2, c
    assert merge_runs(row[None], 0.99) == [[(0, 3), (3, 5), (5, 6)]]
    (merged,) = automerge(row[None], 0.99)
    torch.testing.assert_close(merged, torch.stack([row[0:3].mean(0), row[3:5].mean(0), c]))
    # the original emits token 0 on its own, drops the last run (c) and leaves b out of the mean of b's run
    orig = original_automerge(row[None], 0.99)[0]
    assert orig.shape[0] == 3 and torch.equal(orig[0], a) and not torch.allclose(orig[-1], c)


def test_content_is_kept_length_weighted_means_sum_to_the_tokens():
    x = rand(1, 81, 16, seed=2)
    x[0, 10:40] = x[0, 10] + 0.01 * rand(30, 16, seed=3)  # a large uniform area
    runs = merge_runs(x, 0.9)[0]
    (merged,) = automerge(x, 0.9)
    assert len(runs) == merged.shape[0] < 81
    lengths = torch.tensor([b - a for a, b in runs], dtype=torch.float32)
    torch.testing.assert_close((merged * lengths[:, None]).sum(0), x[0].sum(0), rtol=1e-5, atol=1e-5)
    assert [r for r in runs if r[1] - r[0] > 1] == [(10, 40)]


def test_threshold_one_merges_identical_tokens_only_vector_6():
    distinct = rand(1, 20, 8, seed=4)
    assert merged_count(distinct, 1.0) == [20]
    torch.testing.assert_close(automerge(distinct, 1.0)[0], distinct[0])
    same = rand(1, 8, seed=5).expand(1, 20, 8).contiguous()
    (one,) = automerge(same, 1.0)
    assert one.shape == (1, 8)
    torch.testing.assert_close(one[0], same[0, 0])


def test_a_batch_whose_items_merge_to_different_lengths():
    x = torch.stack([rand(8, seed=6).expand(12, 8), rand(12, 8, seed=7)])
    with pytest.raises(RuntimeError):
        original_automerge(x, 0.95)
    out = automerge(x, 0.95)
    assert [t.shape for t in out] == [(1, 8), (12, 8)]
    assert merged_count(x, 0.95) == [1, 12]


def test_compared_with_the_run_mean_not_the_previous_token():
    angles = torch.deg2rad(torch.tensor([0.0, 25.0, 50.0, 75.0]))
    ramp = torch.stack([angles.cos(), angles.sin()], dim=1)  # 25° apart: cos 0.906 to the previous token
    # the third token is 37.5° from the mean of the first two (cos 0.79 < 0.9), so it starts a new run
    assert merge_runs(ramp[None], 0.9) == [[(0, 2), (2, 4)]]


def test_zero_tokens_dtype_and_empty_rows():
    a = rand(8, seed=8)
    x = torch.stack([a, a, torch.zeros(8), a])[None]
    assert merge_runs(x, 0.5) == [[(0, 2), (2, 3), (3, 4)]]  # a zero token has cosine 0 to a non-zero one
    assert merge_runs(x, 0.0) == [[(0, 4)]]
    assert merged_count(torch.zeros(1, 4, 8), 1.0) == [1]  # zero tokens are identical to each other
    half = rand(2, 9, 8, seed=9).to(torch.bfloat16)
    out = automerge(half, 0.5)
    assert all(t.dtype == torch.bfloat16 and t.shape[1] == 8 for t in out)
    assert automerge(torch.zeros(2, 0, 8), 0.8)[0].shape == (0, 8)


@pytest.mark.parametrize("bad", [1.5, -2.0, float("nan"), True, "0.8"])
def test_threshold_is_validated(bad):
    with pytest.raises(ArgumentError, match="threshold"):
        automerge(rand(1, 4, 8), bad)


def test_tokens_shape_is_validated():
    with pytest.raises(ArgumentError, match="tokens"):
        automerge(rand(4, 8), 0.8)
