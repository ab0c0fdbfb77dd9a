"""The prefill estimate believes the faster forwards of its window (issue 19, from an H100 run)."""

from __future__ import annotations

import pytest

from lmtier.cost import FAST_QUANTILE, ChunkSpan, ReadCost, RecomputeEstimator, plan_load

CHUNK_BYTES = 37_748_736  # one 256-token chunk of a Qwen3-8B (36 layers, 8 KV heads, bf16)
FULL = [(0, 10_000)]
NVME_COLD = ReadCost(latency_s=0.0, seconds_per_byte=1 / 2.26e9)  # learned in that run


def disk_hit() -> list[ChunkSpan]:
    return [ChunkSpan(i * 256, (i + 1) * 256, CHUNK_BYTES, "nvme") for i in range(39)]


def test_a_slow_first_prefill_does_not_make_a_cold_disk_worth_loading() -> None:
    # what a fresh engine timed on the H100: its first full prefill held up (0.82 s, 12k tok/s),
    # the next as every HF prefill of that run (0.36-0.37 s, ~27.5k tok/s)
    est = RecomputeEstimator()
    est.observe(FULL, 0.82)
    cost = est.cost()
    assert cost is not None and cost.tokens_per_s(10_000) == pytest.approx(12_195, rel=1e-3)
    plan = plan_load(disk_hit(), policy="cost", margin=0.1, reads={"nvme": NVME_COLD}, recompute=cost)
    assert plan.load_tokens == 9984  # one sample: believed (this was the bug's whole evidence)
    est.observe(FULL, 0.365)
    cost = est.cost()
    assert cost is not None and cost.seconds(0, 10_000) == pytest.approx(0.365, rel=1e-3)
    plan = plan_load(disk_hit(), policy="cost", margin=0.1, reads={"nvme": NVME_COLD}, recompute=cost)
    assert (plan.load_tokens, plan.reason) == (0, "nvme ~651 ms > recompute ~364 ms")


def test_forwards_held_up_now_and_then_do_not_move_the_estimate() -> None:
    est = RecomputeEstimator()
    for i in range(16):
        est.observe(FULL, 0.9 if i % 5 == 0 else 0.37)  # every fifth held up (4 of 16)
    cost = est.cost()
    assert cost is not None and cost.seconds(0, 10_000) == pytest.approx(0.37, rel=1e-3)


def test_one_forward_timed_too_fast_does_not_make_recomputing_free() -> None:
    est = RecomputeEstimator()
    for _ in range(7):
        est.observe(FULL, 0.37)
    est.observe(FULL, 0.001)  # a clock glitch
    cost = est.cost()
    assert cost is not None and cost.seconds(0, 10_000) == pytest.approx(0.37, rel=1e-3)


def test_an_engine_that_got_slower_is_believed_once_most_of_its_window_says_so() -> None:
    est = RecomputeEstimator(window=16)
    for _ in range(16):
        est.observe(FULL, 0.37)
    for _ in range(int(16 * (1 - FAST_QUANTILE))):  # 12 of 16 slower: still the fast quartile
        est.observe(FULL, 0.74)
    cost = est.cost()
    assert cost is not None and cost.seconds(0, 10_000) == pytest.approx(0.37, rel=1e-3)
    est.observe(FULL, 0.74)  # 13 of 16: the quartile is slow now
    cost = est.cost()
    assert cost is not None and cost.seconds(0, 10_000) == pytest.approx(0.74, rel=1e-3)


def test_the_estimate_keeps_the_fits_shape_across_lengths() -> None:
    # tokens and attention told apart, then every sample 20% slow but one: scaled, not refitted
    est = RecomputeEstimator()
    per_token, per_pair = 20e-6, 2e-9

    def true(n: int) -> float:
        return per_token * n + per_pair * n * n / 2

    lengths = [1000, 4000, 8000, 16000]
    for n in lengths * 4:
        est.observe([(0, n)], true(n))
    fast = est.cost()
    assert fast is not None and fast.per_pair_s == pytest.approx(per_pair, rel=1e-3)
    for n in lengths * 3:
        est.observe([(0, n)], 1.2 * true(n))
    cost = est.cost()
    assert cost is not None
    assert cost.seconds(0, 8000) == pytest.approx(true(8000), rel=0.05)
