"""The SLA planner (issue 26): profile -> observe -> predict -> decide -> act (no torch, no engine).

    profile.py    the measured profile (prefill time vs prompt length, decode ITL vs concurrency
                  and KV use), its JSON format and interpolation; profiler.py measures one
                  (`pdserve profile`, over HTTP)
    predictor.py  next-interval load: last value, moving average, linear trend
    decide.py     the counts that meet the TTFT and ITL SLOs within max_workers (M/D/1 prefill,
                  Little's law decode), documented there
    planner.py    one step per interval: correction factors, prediction, decision, history (pure)
    scrape.py     the router's /metrics as snapshots, two of them as an observation
    actions.py    a decision and the workers there are -> switches, starts, stops (pure)
    connector.py  the interface a deployment implements, and the local one (pdserve's HTTP API)
    live.py       `pdserve planner`'s loop: read, plan, act, log, export; cli.py its flags

Nothing here imports numpy at import time (profile.py does when it fits): `pdserve --help` stays light.
"""

from pdserve.planner.decide import Decision, Load, Slo, decide
from pdserve.planner.planner import Correction, Observation, Planner, PlannerConfig, PlanStep, load_series, replay
from pdserve.planner.predictor import PREDICTORS, Predictor
from pdserve.planner.profile import DecodePoint, PrefillPoint, Profile, load_profile, save_profile

__all__ = ["PREDICTORS", "Correction", "Decision", "DecodePoint", "Load", "Observation", "PlanStep", "Planner",
           "PlannerConfig", "Predictor", "PrefillPoint", "Profile", "Slo", "decide", "load_profile", "load_series",
           "replay", "save_profile"]
