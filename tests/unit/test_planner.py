"""The planner's core on a recorded metric series: the documented decisions (pdserve/planner/decide.py).

The profile below lies exactly on the documented models, so every number can be done by hand:
prefill 1 ms per prompt token (100 -> 0.1 s, 1000 -> 1.0 s, then 1.2 ms per token up to 2000);
decode ITL = 0.04 + 0.002 * streams + 0.00001 * KV tokens. SLOs: TTFT 1 s, ITL 100 ms; 3 workers.

Prefill-heavy phase (1 req/s, 500 in / 20 out):
  prefill: s = 0.5 s, k = 1/0.5 - 1 = 1, rho_max = 2/3, need = 1 * 0.5 / (2/3) = 0.75
  decode:  ITL(c) = 0.04 + 0.002c + 0.00001 * 510c <= 0.1  ->  c* = 8, ITL 0.0968,
           need = 1 * 20 * 0.0968 / 8 = 0.242
  fill 3 workers: P = round(3 * 0.75 / 0.992) = 2, D = 1           (no fill: 1P 1D)
Decode-heavy phase (1 req/s, 50 in / 200 out):
  prefill: s = 0.05 s, rho_max = 0.9 (cap), need = 0.05 / 0.9 = 0.0556
  decode:  ITL(c) = 0.04 + 0.0035c <= 0.1  ->  c* = 17, need = 200 * 0.0995 / 17 = 1.17
  -> 1P 2D; the ITL observed there is 1.5x the profile's, so the decode correction climbs
  1 -> 1.25 -> 1.375 -> 1.4375 ...: at 1.25, c* = 11 and need = 1.78 (1P 2D); from 1.4375,
  c* = 8 and need = 2.44: 1P 3D does not fit in 3 -> 1P 2D, "capped".
Back to prefill-heavy: 2P 1D again at the first interval (predictor "last").
"""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import pytest

from pdserve.planner import (Correction, DecodePoint, Load, Observation, Planner, PlannerConfig, Predictor,
                             PrefillPoint, Profile, Slo, decide, load_profile, load_series, replay, save_profile)
from pdserve.planner.decide import md1_ttft

PROFILE = Profile(model="test", kv_capacity_tokens=20000, max_concurrency=32,
                  prefill=[PrefillPoint(100, 0.1), PrefillPoint(1000, 1.0), PrefillPoint(2000, 2.2)],
                  decode=[DecodePoint(1, 0, 0.042), DecodePoint(10, 0, 0.06), DecodePoint(1, 10000, 0.142),
                          DecodePoint(10, 10000, 0.16), DecodePoint(4, 3000, 0.078)])
SLO = Slo(1.0, 0.1)
PREFILL_HEAVY = (500.0, 20.0)
DECODE_HEAVY = (50.0, 200.0)


def test_profile_interpolates_and_fits_the_plane(tmp_path: Path) -> None:
    assert PROFILE.prefill_s(550) == pytest.approx(0.55)
    assert PROFILE.prefill_s(50) == pytest.approx(0.05)  # below the first point: the first slope
    assert PROFILE.prefill_s(3000) == pytest.approx(3.4)  # beyond the last: the last slope (1.2 ms/token)
    m = PROFILE.decode_model()
    assert (m.base_s, m.per_stream_s, m.per_kv_token_s) == pytest.approx((0.04, 0.002, 0.00001))
    save_profile(PROFILE, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == PROFILE
    (tmp_path / "bad.json").write_text('{"model": "x"}')
    with pytest.raises(ValueError, match="bad.json"):
        load_profile(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="three points"):
        msgspec.convert({**msgspec.to_builtins(PROFILE), "decode": [{"concurrency": c, "kv_tokens": 100 * c,
                                                                     "itl_s": 0.05} for c in (1, 2, 3)]}, Profile)


def test_predictors() -> None:
    series = [10.0, 12.0, 14.0, 16.0]
    got = {}
    for kind in ("last", "average", "trend"):
        p = Predictor(kind, window=3)
        assert p.predict() == 0.0
        for v in series:
            p.observe(v)
        got[kind] = p.predict()
    assert got == pytest.approx({"last": 16.0, "average": 14.0, "trend": 18.0})
    falling = Predictor("trend", 3)
    for v in (500.0, 500.0, 50.0):
        falling.observe(v)
    assert falling.predict() == 0.0  # a step down extrapolates below zero: clamped
    with pytest.raises(ValueError):
        Predictor("oracle")


def test_decisions_by_hand() -> None:
    a = decide(Load(1.0, *PREFILL_HEAVY), PROFILE, SLO, max_workers=3, fill=True)
    assert (a.prefill, a.decode, a.streams_per_decode, a.notes) == (2, 1, 8, ())
    assert (a.prefill_need, a.decode_need) == pytest.approx((0.75, 20 * 0.0968 / 8))
    assert (decide(Load(1.0, *PREFILL_HEAVY), PROFILE, SLO, 3).prefill, decide(Load(1.0, *PREFILL_HEAVY),
                                                                                  PROFILE, SLO, 3).decode) == (1, 1)
    b = decide(Load(1.0, *DECODE_HEAVY), PROFILE, SLO, max_workers=3)
    assert (b.prefill, b.decode, b.streams_per_decode) == (1, 2, 17)
    assert (b.prefill_need, b.decode_need) == pytest.approx((0.05 / 0.9, 200 * 0.0995 / 17))
    big = decide(Load(4.0, *DECODE_HEAVY), PROFILE, SLO, max_workers=8)  # room for the full need
    assert (big.prefill, big.decode, big.notes) == (1, math.ceil(4 * 200 * 0.0995 / 17), ())
    slow = decide(Load(1.0, 1500, 20), PROFILE, SLO, 3)  # 1.6 s of prefill alone > the 1 s TTFT SLO
    assert "ttft_unreachable" in slow.notes and slow.prefill_need == pytest.approx(1.6 / 0.9)
    tight = decide(Load(1.0, *DECODE_HEAVY), PROFILE, Slo(1.0, 0.03), 3)  # below one stream's ITL
    assert "itl_unreachable" in tight.notes and tight.streams_per_decode == 1
    assert md1_ttft(1.0, 0.5) == pytest.approx(0.75) and md1_ttft(2.0, 0.5) == math.inf


def observation(t: float, phase: tuple[float, float], p: int, d: int, itl_factor: float) -> Observation:
    """What the router saw in one 10 s interval at 1 req/s: latencies as the models say (TTFT) and
    `itl_factor` times the profile's ITL (decode), with the streams Little's law gives."""
    isl, osl = phase
    ttft = md1_ttft(1.0 / p, PROFILE.prefill_s(isl))
    streams = 1.0 * osl * 0.1  # rate * output * ITL at the SLO: 2 (prefill-heavy), 20 (decode-heavy)
    c = streams / d
    itl = PROFILE.itl_s(c, c * (isl + osl / 2)) * itl_factor
    return Observation(t=t, interval_s=10, requests=10, prompt_tokens=isl, output_tokens=osl, ttft_s=ttft,
                       itl_s=itl, prefill_workers=p, decode_workers=d, decode_streams=streams)


def recorded_series() -> list[Observation]:
    """Prefill-heavy on 1P2D (the start), decode-heavy on 2P1D (what the planner chose), then
    prefill-heavy again on 1P2D; 5 intervals each."""
    out = [observation(10 * (i + 1), PREFILL_HEAVY, 1, 2, 1.0) for i in range(5)]
    out += [observation(10 * (i + 6), DECODE_HEAVY, 2, 1, 1.5) for i in range(5)]
    out += [observation(10 * (i + 11), PREFILL_HEAVY, 1, 2, 1.0) for i in range(5)]
    return out


def test_recorded_series_makes_the_documented_decisions(tmp_path: Path) -> None:
    path = tmp_path / "series.jsonl"
    path.write_bytes(b"\n".join(msgspec.json.encode(o) for o in recorded_series()))
    series = load_series(path)
    assert series == recorded_series()
    cfg = PlannerConfig(ttft_slo_ms=1000, itl_slo_ms=100, max_workers=3, predictor="last", fill=True)
    steps = replay(Planner(cfg, PROFILE), series)
    counts = [(s.decision.prefill, s.decision.decode) for s in steps]
    assert counts == [(2, 1)] * 5 + [(1, 2)] * 5 + [(2, 1)] * 5
    decode_corr = [round(s.decode_correction, 4) for s in steps]
    assert decode_corr[:5] == [1.0] * 5  # ITL as profiled
    assert decode_corr[5:9] == [1.25, 1.375, 1.4375, 1.4688]  # halfway to 1.5 each interval
    assert all(s.prefill_correction == pytest.approx(1.0) for s in steps)  # TTFT as modelled
    b = [s.decision for s in steps[5:10]]
    assert (b[0].streams_per_decode, b[0].notes) == (11, ())
    assert b[0].decode_need == pytest.approx(200 * (0.04 + 0.0035 * 11) * 1.25 / 11)
    assert all(d.notes == ("capped",) for d in b[2:]) and b[2].streams_per_decode == 8  # 1P 3D does not fit
    assert steps[10].decode_correction < decode_corr[9]  # back to ITL as profiled: the factor relaxes
    no_fill = replay(Planner(PlannerConfig(1000, 100, 3, predictor="last"), PROFILE), series)
    assert [(s.decision.prefill, s.decision.decode) for s in no_fill][:6] == [(1, 1)] * 5 + [(1, 2)]


def test_correction_is_bounded_and_ignores_empty_intervals() -> None:
    c = Correction(alpha=1.0)
    c.update(100.0, 1.0)
    assert c.value == Correction.HIGH
    c.update(None, 1.0)
    c.update(1.0, math.inf)
    assert c.value == Correction.HIGH
    planner = Planner(PlannerConfig(1000, 100, 3, predictor="average"), PROFILE)
    planner.step(observation(10, PREFILL_HEAVY, 1, 2, 1.0))
    idle = planner.step(Observation(t=20, interval_s=10, requests=0, prefill_workers=1, decode_workers=2))
    assert idle.load == Load(0.5, 500.0, 20.0)  # lengths remember the last busy interval; the rate averages 1, 0


def test_no_load_predicted_holds_the_last_decision() -> None:
    """An idle spell (rate 0 predicted) decides nothing new: the last decision holds, noted idle."""
    planner = Planner(PlannerConfig(1000, 100, 3, predictor="last", fill=True), PROFILE)
    busy = planner.step(observation(10, PREFILL_HEAVY, 1, 2, 1.0))
    assert (busy.decision.prefill, busy.decision.decode) == (2, 1)
    idle = planner.step(Observation(t=20, interval_s=10, requests=0, prefill_workers=2, decode_workers=1))
    assert idle.load.rate == 0 and (idle.decision.prefill, idle.decision.decode) == (2, 1)
    assert idle.decision.notes == ("idle",)
    again = planner.step(Observation(t=30, interval_s=10, requests=0, prefill_workers=2, decode_workers=1))
    assert again.decision.notes == ("idle",)
