"""`pdserve profile`: measure one worker of this machine over HTTP and write the profile the planner plans with.

Against a running unified server (`pdserve serve`, mode null: it prefills and decodes; give the
flags the workers will run with), through `/generate` with token ids, greedy, `ignore_eos`:

  prefill   for each prompt length: `repeats` requests of 1 output token, one at a time, each
            with fresh random ids (no prefix-cache hit); the median wall time is the point
            (what the planner's TTFT model needs: prefill alone on an idle worker)
  decode    for each (concurrency c, prompt length L): c streams at once, each L random ids and
            `output_tokens` tokens; a stream's ITL is the mean gap between its token events after
            the first, the point's ITL the median over the streams; its KV use is c * (L + out / 2)
  limits    kv_capacity_tokens (max_total_num_tokens) and max_concurrency (max_running_requests)
            from its /server_info

    points:  prefill (L, s)  ...           decode (c, kv, itl)  c in {1, 4, 8} x L in {64, 512}
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.planner.connector import post_json
from pdserve.planner.profile import DecodePoint, PrefillPoint, Profile
from pdserve.planner.scrape import http_get

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class ProfileSpec:
    url: str
    prompt_lens: tuple[int, ...] = (32, 128, 512, 1024)
    concurrency: tuple[int, ...] = (1, 4, 8)
    decode_prompt_lens: tuple[int, ...] = (64, 512)
    output_tokens: int = 48
    repeats: int = 3
    api_key: str | None = None
    seed: int = 0


class _Ids:
    def __init__(self, vocab: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vocab = vocab

    def __call__(self, n: int) -> list[int]:
        return [self.rng.randrange(100, self.vocab) for _ in range(n)]


def _body(ids: list[int], max_new: int, stream: bool) -> dict[str, object]:
    return {"input_ids": ids, "stream": stream,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}


def _stream_gaps(spec: ProfileSpec, ids: list[int], out: list[float], errors: list[str]) -> None:
    """One streamed request; appends its mean gap between token events after the first."""
    headers = {"Content-Type": "application/json",
               **({"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {})}
    req = urllib.request.Request(spec.url + "/generate", data=json.dumps(_body(ids, spec.output_tokens, True)).encode(),
                                 headers=headers, method="POST")
    times: list[float] = []
    try:
        with _OPENER.open(req, timeout=600) as resp:
            for line in resp:
                if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                    times.append(time.perf_counter())
    except OSError as exc:
        errors.append(str(exc))
        return
    if len(times) > 2:
        out.append((times[-1] - times[1]) / (len(times) - 2))


def measure(spec: ProfileSpec, log: Callable[[str], None] = print) -> Profile:
    info = json.loads(http_get(spec.url + "/server_info", spec.api_key))
    vocab = int(json.loads(http_get(spec.url + "/model_info", spec.api_key))["vocab_size"])
    ctx = int(info["context_length"])
    ids = _Ids(vocab, spec.seed)
    prefill = []
    for n in sorted({min(n, ctx - 2) for n in spec.prompt_lens}):
        runs = []
        for _ in range(spec.repeats):
            t0 = time.perf_counter()
            status, body = post_json(spec.url + "/generate", _body(ids(n), 1, False), spec.api_key, 600)
            if status != 200:
                raise RuntimeError(f"prefill of {n} tokens answered {status}: {body}")
            runs.append(time.perf_counter() - t0)
        prefill.append(PrefillPoint(n, statistics.median(runs)))
        log(f"prefill {n:5d} tokens: {prefill[-1].seconds * 1000:8.1f} ms")
    decode = []
    for c in spec.concurrency:
        for n in spec.decode_prompt_lens:
            n = min(n, ctx - spec.output_tokens - 2)
            gaps: list[float] = []
            errors: list[str] = []
            threads = [threading.Thread(target=_stream_gaps, args=(spec, ids(n), gaps, errors)) for _ in range(c)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors or not gaps:
                raise RuntimeError(f"decode at concurrency {c}, prompt {n}: {errors[:1] or 'no token events'}")
            point = DecodePoint(c, int(c * (n + spec.output_tokens / 2)), statistics.median(gaps))
            decode.append(point)
            log(f"decode c={c:3d} prompt {n:5d}: ITL {point.itl_s * 1000:7.1f} ms (KV {point.kv_tokens} tokens)")
    return Profile(model=str(info.get("served_model_name", "default")), device=str(info.get("device", "cpu")),
                   kv_capacity_tokens=int(info["max_total_num_tokens"]),
                   max_concurrency=int(info["max_running_requests"]), prefill=prefill, decode=decode)
