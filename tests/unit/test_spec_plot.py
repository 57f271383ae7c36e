"""benchmarks/spec_decode.py's plot: drawn from a saved results.json (--plot-only), titled with its run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[2]


def test_plot_only_draws_the_quick_run_and_names_it(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("_spec_plot", None)
    import _spec_plot

    titles: list[str] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (titles.append(fig._suptitle.get_text()),
                                                                  save(fig, *a, **k)))
    results = json.loads((ROOT / "benchmarks/results/spec_decode_quick/results.json").read_text())
    paths = _spec_plot.plot(results, tmp_path)
    assert paths == [tmp_path / "spec_decode.png"] and paths[0].stat().st_size > 10_000
    flat = titles[0].replace("\n", " · ")
    for part in ("machine vm (2 cores", "model default", "load average 9-12", "2026-12-08 00:56 UTC",
                 "batch 16 = 16 in flight"):
        assert part in flat, flat
    assert len(titles) == 1


def test_missing_values_are_marked_not_drawn(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import _spec_plot

    rows = [{"system": s, "workload": "chat", "batch": 16, "tok_s": 1.0, "tpot_p50_ms": 2.0, "itl_p50_ms": 3.0,
             "accept_length": a} for s, a in (("off", None), ("ngram", 1.5))]
    results = {"rows": rows, "load": "up 1 day, load average: 1.00, 2.00, 3.00", "quick": False,
               "machine": "machine m (4 cores, x86_64)", "started_at": 0, "model": "default", "k": 4,
               "output_len": 192, "batch1_requests": 9, "rounds": 2, "threads": None}
    assert "load average 1.00, 2.00, 3.00" in _spec_plot.run_title(results)
    assert "batch 16 = 32 in flight" in _spec_plot.run_title(results)
    figs: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figs.append(fig), save(fig, *a, **k)))
    _spec_plot.plot(results, tmp_path)
    accept = figs[0].axes[3]
    assert len(accept.patches) == 1 and [t.get_text() for t in accept.texts] == ["n/a", "1.50"]
