"""lmtier.cost: the learned read and prefill costs, and the decision of how much of a hit to load."""

from __future__ import annotations

import math

import pytest

from lmtier.config import load_config
from lmtier.cost import (
    ChunkSpan,
    LoadPlan,
    OnloadEstimator,
    ReadCost,
    RecomputeCost,
    RecomputeEstimator,
    TierReadEstimator,
    plan_load,
    teaches_prefill,
)
from lmtier.errors import ConfigError

MB = 1_000_000
CHUNK_BYTES = 37_748_736  # one 256-token chunk of a Qwen3-8B (36 layers, 8 KV heads, bf16)


def chunks(tiers: list[str], tokens: int = 256, nbytes: int = CHUNK_BYTES) -> list[ChunkSpan]:
    return [ChunkSpan(i * tokens, (i + 1) * tokens, nbytes, t) for i, t in enumerate(tiers)]


# -- estimators ------------------------------------------------------------------------------------
def test_a_read_estimate_needs_samples_or_a_seed() -> None:
    est = TierReadEstimator(min_samples=2)
    assert est.cost() is None
    est.observe(64 * MB, 0.032)
    assert est.cost() is None
    est.observe(32 * MB, 0.016)
    cost = est.cost()
    assert cost is not None and cost.samples == 2
    assert cost.bytes_per_s == pytest.approx(2000 * MB, rel=1e-6)
    seeded = TierReadEstimator(seed_bytes_per_s=500 * MB, seed_latency_s=0.002)
    cost = seeded.cost()
    assert cost is not None and cost.samples == 0
    assert cost.bytes_per_s == pytest.approx(500 * MB, rel=1e-3)
    assert cost.latency_s == pytest.approx(0.002, rel=1e-3)


def test_latency_and_bandwidth_are_told_apart_when_reads_differ_in_size() -> None:
    est = TierReadEstimator()
    for n in (1, 4, 16, 64, 1, 16):  # a 3 ms round trip, then 1 GB/s
        est.observe(n * MB, 0.003 + n * MB / 1e9)
    cost = est.cost()
    assert cost is not None
    assert cost.latency_s == pytest.approx(0.003, rel=1e-3)
    assert cost.bytes_per_s == pytest.approx(1e9, rel=1e-3)
    assert cost.seconds(100 * MB, calls=2) == pytest.approx(0.106, rel=1e-3)


def test_reads_of_one_size_give_a_bandwidth_not_an_arbitrary_split() -> None:
    est = TierReadEstimator()
    for _ in range(4):
        est.observe(CHUNK_BYTES, CHUNK_BYTES / 2.17e9)
    cost = est.cost()
    assert cost is not None and cost.latency_s == 0
    assert cost.bytes_per_s == pytest.approx(2.17e9, rel=1e-6)


def test_the_read_estimate_follows_a_tier_whose_speed_changes() -> None:
    est = TierReadEstimator()
    for _ in range(20):
        est.observe(CHUNK_BYTES, CHUNK_BYTES / 2e9)  # a cold disk
    slow = est.cost()
    assert slow is not None and slow.bytes_per_s == pytest.approx(2e9)
    speeds = []
    for _ in range(12):
        est.observe(CHUNK_BYTES, CHUNK_BYTES / 10e9)  # the page cache is warm now
        cost = est.cost()
        assert cost is not None
        speeds.append(cost.bytes_per_s)
    assert slow.bytes_per_s < speeds[0] < speeds[1] < speeds[2] < speeds[3]
    assert speeds[-1] == pytest.approx(10e9)  # a window of fast reads later it is believed


def test_a_tier_that_turns_slow_is_believed_at_once() -> None:
    est = TierReadEstimator()
    for _ in range(20):
        est.observe(CHUNK_BYTES, CHUNK_BYTES / 10e9)
    est.observe(CHUNK_BYTES, CHUNK_BYTES / 1e9)  # one read ten times slower
    cost = est.cost()
    assert cost is not None and cost.bytes_per_s < 5e9  # the fit averages times: a slow read weighs


def test_a_big_read_counts_as_one_sample_not_forty() -> None:
    # samples are weighted by their size: one 1.5 GB read does not drown later 38 MB reads
    est = TierReadEstimator()
    est.observe(40 * CHUNK_BYTES, 40 * CHUNK_BYTES / 2e9)
    for _ in range(3):
        est.observe(CHUNK_BYTES, CHUNK_BYTES / 10e9)
    cost = est.cost()
    assert cost is not None and cost.bytes_per_s == pytest.approx(5e9)  # mean time per byte of 4 reads


def test_recompute_needs_a_forward_or_a_seed() -> None:
    est = RecomputeEstimator()
    assert est.cost() is None
    est.observe([(0, 0)], 1.0)  # nothing computed: not a sample
    est.observe([(0, 100)], 0.0)
    assert est.cost() is None
    est.observe([(0, 10_000)], 0.369)
    cost = est.cost()
    assert cost is not None
    assert cost.seconds(0, 10_000) == pytest.approx(0.369, rel=1e-6)
    assert cost.seconds(5_000, 10_000) == pytest.approx(0.1845, rel=1e-6)  # one length: a per-token cost
    seeded = RecomputeEstimator(seed_tokens_per_s=20_000).cost()
    assert seeded is not None and seeded.tokens_per_s(4096) == pytest.approx(20_000, rel=1e-3)


def test_recompute_separates_tokens_and_attention() -> None:
    est = RecomputeEstimator()
    per_token, per_pair = 20e-6, 2e-9

    def true(spans: list[tuple[int, int]]) -> float:
        return sum(per_token * (e - s) + per_pair * (e * e - s * s) / 2 for s, e in spans)

    shapes = [[(0, 1000)], [(0, 8000)], [(0, 16000)], [(2000, 2300), (500, 501)], [(0, 4000), (0, 3000)],
              [(12000, 12016)], [(0, 500)]]
    for spans in shapes * 2:
        est.observe(spans, true(spans))
    cost = est.cost()
    assert cost is not None
    assert cost.per_token_s == pytest.approx(per_token, rel=1e-3)
    assert cost.per_pair_s == pytest.approx(per_pair, rel=1e-3)
    assert cost.seconds(4000, 8000) == pytest.approx(true([(4000, 8000)]), rel=1e-3)
    assert cost.tokens_per_s(1024) > cost.tokens_per_s(16384)


def test_a_step_overhead_is_folded_into_the_per_token_cost() -> None:
    # prefills that all take about the same time (a busy machine): recomputing is not free
    est = RecomputeEstimator()
    for n in (300, 600, 1000, 2000):
        est.observe([(0, n)], 0.45)
    cost = est.cost()
    assert cost is not None and cost.seconds(0, 896) > 0.1


@pytest.mark.xfail(strict=True, reason="known gap (issue 19): the prefill model has no per-forward constant, so short "
                   "suffix forwards over a long context (vLLM's prefix-cache hits, timed by the connector) force "
                   "their fixed cost into the attention term; today 10.6 s for a 0.365 s prefill")
def test_short_suffix_forwards_over_a_long_context_do_not_inflate_the_prefill_estimate() -> None:
    # an H100-like engine: a 10,000-token prefill takes 0.365 s; a 16-token suffix over 9,984
    # cached tokens takes 34 ms, nearly all of it the forward's fixed cost (weights, launches)
    est = RecomputeEstimator()
    for spans, seconds in [([(0, 10000)], 0.365)] * 2 + [([(9984, 10000)], 0.034)] * 8:
        est.observe(spans, seconds)
    cost = est.cost()
    assert cost is not None and 0.18 < cost.seconds(0, 10000) < 0.73


def test_only_forwards_computing_a_chunk_of_prompt_tokens_teach_the_prefill_speed() -> None:
    assert teaches_prefill([(0, 10000)])
    assert teaches_prefill([(8192, 10000), (500, 501)])  # a chunked prefill's chunk, beside a decode
    assert teaches_prefill([(0, 200), (3000, 3056)])  # 256 prompt tokens in all
    assert not teaches_prefill([(9984, 10000)])  # a suffix after the engine's own prefix-cache hit
    assert not teaches_prefill([(700, 701)] * 300)  # decode steps only
    assert not teaches_prefill([])


def test_estimators_ignore_nonsense_samples() -> None:
    est = TierReadEstimator()
    est.observe(-1, 0.1)
    est.observe(10, -0.1)
    est.observe(10, math.nan)
    est.observe(10, 0.1, calls=0)
    assert est.samples == 0
    with pytest.raises(ValueError, match="bytes_per_s"):
        TierReadEstimator(seed_bytes_per_s=0)
    with pytest.raises(ValueError, match="tokens_per_s"):
        RecomputeEstimator(seed_tokens_per_s=-5)


def test_the_onload_estimate_is_the_fastest_recent_copy() -> None:
    est = OnloadEstimator(window=4)
    assert est.cost() is None
    est.observe(10 * MB, 0.001)  # 10 GB/s
    est.observe(10 * MB, 0.1)  # the copying thread was descheduled: not a dearer copy
    cost = est.cost()
    assert cost is not None and cost.bytes_per_s == pytest.approx(10e9) and cost.latency_s == 0
    for _ in range(4):  # the fast one left the window: the copies did get slower
        est.observe(10 * MB, 0.01)
    cost = est.cost()
    assert cost is not None and cost.bytes_per_s == pytest.approx(1e9)
    est.observe(0, 0.1)
    est.observe(10, -1.0)
    assert est.samples == 6


# -- the decision ------------------------------------------------------------------------------------
DISK_COLD = ReadCost(latency_s=0.0, seconds_per_byte=1 / 2.17e9)
DISK_WARM = ReadCost(latency_s=0.0, seconds_per_byte=1 / 10e9)
RAM = ReadCost(latency_s=2e-5, seconds_per_byte=0.0)
H100_PREFILL = RecomputeCost(per_token_s=0.369 / 10_000, per_pair_s=0.0)


def test_a_cold_disk_slower_than_prefill_loads_nothing() -> None:
    plan = plan_load(chunks(["disk"] * 39), policy="cost", margin=0.1, reads={"disk": DISK_COLD},
                     recompute=H100_PREFILL)
    assert (plan.hit_tokens, plan.load_tokens, plan.load_chunks, plan.skipped_tokens) == (9984, 0, 0, 9984)
    assert plan.reason == "disk ~678 ms > recompute ~368 ms"
    assert plan.decided


def test_a_warm_disk_and_ram_load_everything() -> None:
    for tier, cost in (("disk", DISK_WARM), ("hot", RAM)):
        plan = plan_load(chunks([tier] * 39), policy="cost", margin=0.1, reads={tier: cost}, recompute=H100_PREFILL)
        assert plan.load_tokens == 9984 and plan.load_chunks == 39
        assert plan.reason.startswith(f"{tier} ~") and "< recompute ~368 ms" in plan.reason


def test_half_in_ram_half_on_a_cold_disk_loads_the_ram_half() -> None:
    plan = plan_load(chunks(["hot"] * 20 + ["disk"] * 19), policy="cost", margin=0.1,
                     reads={"hot": RAM, "disk": DISK_COLD}, recompute=H100_PREFILL)
    assert (plan.load_tokens, plan.load_chunks) == (5120, 20)
    assert plan.reason == "disk ~331 ms > recompute ~179 ms for the last 4864 tokens"


def test_the_margin_tips_a_close_call_towards_recomputing() -> None:
    # loading takes 90% of the recompute time: worth it with no margin, not with 20%
    recompute = RecomputeCost(per_token_s=1e-4, per_pair_s=0.0)
    read = ReadCost(0.0, 0.9 * 256 * 1e-4 / CHUNK_BYTES)
    spans = chunks(["s3"] * 10)
    assert plan_load(spans, policy="cost", margin=0.0, reads={"s3": read}, recompute=recompute).load_chunks == 10
    assert plan_load(spans, policy="cost", margin=0.2, reads={"s3": read}, recompute=recompute).load_chunks == 0


def test_a_near_tie_loads() -> None:
    # expected to lose 1 ms by loading: within the slack, the hit is loaded
    recompute = RecomputeCost(per_token_s=0.010 / 256, per_pair_s=0.0)
    read = ReadCost(0.0, 0.011 / CHUNK_BYTES)
    plan = plan_load(chunks(["nvme"]), policy="cost", margin=0.0, reads={"nvme": read}, recompute=recompute)
    assert plan.load_chunks == 1
    assert "near tie" in plan.reason


def test_per_call_latency_counts_once_per_slice() -> None:
    # a remote tier with a 50 ms round trip and plenty of bandwidth: one call for every chunk
    recompute = RecomputeCost(per_token_s=0.1 / 1024, per_pair_s=0.0)
    read = ReadCost(0.05, 1 / 20e9)
    small = chunks(["redis"] * 4, nbytes=MB)  # 4 MB in one call: 50 ms < 100 ms of compute
    assert plan_load(small, policy="cost", margin=0.1, reads={"redis": read}, recompute=recompute).load_chunks == 4
    sliced = plan_load(small, policy="cost", margin=0.1, reads={"redis": read}, recompute=recompute,
                       slice_bytes=MB)  # four calls: 200 ms > 100 ms
    assert sliced.load_chunks == 0


def test_tokens_the_engine_has_already_are_free() -> None:
    # the engine's own prefix cache holds the first 5120 tokens: only the rest is weighed
    plan = plan_load(chunks(["hot"] * 20 + ["disk"] * 19), policy="cost", margin=0.1,
                     reads={"hot": RAM, "disk": DISK_COLD}, recompute=H100_PREFILL, start=5120)
    assert (plan.load_tokens, plan.load_chunks) == (5120, 20)
    assert plan.reason.startswith("disk ~331 ms > recompute ~179 ms")


def test_the_onload_cost_counts_only_where_it_is_not_overlapped() -> None:
    link = ReadCost(0.0, 1 / 1e9)  # a slow host-to-device link: 38 ms per chunk
    spans = chunks(["hot"] * 39)
    serial = plan_load(spans, policy="cost", margin=0.1, reads={"hot": RAM}, recompute=H100_PREFILL, onload=link)
    overlapped = plan_load(spans, policy="cost", margin=0.1, reads={"hot": RAM}, recompute=H100_PREFILL,
                           onload=link, onload_exposed=1 / 36)
    assert serial.load_chunks == 0 and overlapped.load_chunks == 39


def test_no_estimate_yet_loads_everything_to_learn() -> None:
    spans = chunks(["hot", "hot", "disk"])
    plan = plan_load(spans, policy="cost", margin=0.1, reads={"hot": RAM}, recompute=H100_PREFILL)
    assert plan == LoadPlan(768, 768, 3, "no estimate of disk yet: loading to learn", decided=False)
    plan = plan_load(spans, policy="cost", margin=0.1, reads={"hot": RAM, "disk": DISK_COLD}, recompute=None)
    assert plan.load_tokens == 768 and "no estimate of recompute yet" in plan.reason


def test_the_always_policy_loads_every_hit() -> None:
    plan = plan_load(chunks(["disk"] * 39), policy="always", margin=0.1, reads={"disk": DISK_COLD},
                     recompute=H100_PREFILL)
    assert plan == LoadPlan(9984, 9984, 39, "load_policy: always", decided=False)
    assert plan_load([], policy="cost", margin=0.1, reads={}, recompute=None).load_tokens == 0


# -- configuration -----------------------------------------------------------------------------------
def test_load_policy_and_margin_are_configured_and_checked() -> None:
    tiers = [{"name": "hot", "backend": "cpu"},
             {"name": "nvme", "backend": "disk", "read_bytes_per_s": "2GB", "read_latency_s": 0.0005}]
    cfg = load_config({"tiers": tiers}, env={})
    assert (cfg.load_policy, cfg.load_margin, cfg.recompute_tokens_per_s) == ("cost", 0.1, None)
    assert cfg.tiers[1].read_bytes_per_s == 2_000_000_000 and cfg.tiers[0].read_bytes_per_s is None
    cfg = load_config({"tiers": tiers, "load_policy": "always", "load_margin": 0.5,
                       "recompute_tokens_per_s": 25_000}, env={})
    assert (cfg.load_policy, cfg.load_margin, cfg.recompute_tokens_per_s) == ("always", 0.5, 25_000)
    assert load_config({"tiers": tiers}, env={"LMTIER_LOAD_POLICY": "always"}).load_policy == "always"


@pytest.mark.parametrize(("extra", "expected"), [
    ({"load_policy": "sometimes"}, r"load_policy: Input should be 'always' or 'cost'"),
    ({"load_margin": -0.1}, r"load_margin: Input should be greater than or equal to 0"),
    ({"load_margin": True}, r"load_margin: .*boolean"),
    ({"load_margin": float("inf")}, r"load_margin"),
    ({"recompute_tokens_per_s": 0}, r"recompute_tokens_per_s"),
    ({"tiers": [{"name": "a", "backend": "cpu", "read_bytes_per_s": 0}]}, r"tiers\[0\]\.read_bytes_per_s"),
    ({"tiers": [{"name": "a", "backend": "cpu", "read_latency_s": -1}]}, r"tiers\[0\]\.read_latency_s"),
])
def test_a_bad_load_setting_is_a_config_error_naming_the_key(extra: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config({"tiers": [{"name": "a", "backend": "cpu"}], **extra}, env={})
