"""The SLA planner's core: profile -> predict -> decide prefill and decode counts (pure; no torch, no HTTP).

    profile.py    the measured profile (prefill time vs prompt length, decode ITL vs concurrency
                  and KV use), its JSON format and interpolation
    predictor.py  next-interval load: last value, moving average, linear trend
    decide.py     the counts that meet the TTFT and ITL SLOs within max_workers (M/D/1 prefill,
                  Little's law decode), documented there
    planner.py    one step per interval: correction factors, prediction, decision, history

Acting on a decision (role switches, starting and stopping workers through a connector) and
reading the router's metrics live come with `pdserve planner` (issue 26, phase 2).
"""

from pdserve.planner.decide import Decision, Load, Slo, decide
from pdserve.planner.planner import Correction, Observation, Planner, PlannerConfig, PlanStep, load_series, replay
from pdserve.planner.predictor import PREDICTORS, Predictor
from pdserve.planner.profile import DecodePoint, PrefillPoint, Profile, load_profile, save_profile

__all__ = ["PREDICTORS", "Correction", "Decision", "DecodePoint", "Load", "Observation", "PlanStep", "Planner",
           "PlannerConfig", "Predictor", "PrefillPoint", "Profile", "Slo", "decide", "load_profile", "load_series",
           "replay", "save_profile"]
