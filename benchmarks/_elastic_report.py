"""benchmarks/elastic.py's report: per-phase tables, the whole trace's goodput, switches, discovery, the timeline.

`write_report(results, out)` writes out/report.md and out/timeline.png from results.json's
content and returns the report text: one row per system and phase, the whole trace per system
(within-SLO requests over the summed phase durations), the planner's ratio to the better static
split (target >= 1.15x), each switch the planner made (its seconds: drain + swap + register,
target <= 5 s; and the requests that failed in the trace, target 0), and discovery's costs.
The timeline: every request's TTFT by arrival time for each system (phase boundaries dashed),
and below it the planner's decided prefill count and the prefills serving, each switch marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GOODPUT_TARGET = 1.15
SWITCH_TARGET_S = 5.0


def _whole(system: dict[str, Any]) -> dict[str, float]:
    phases = system["phases"]
    duration = sum(p["duration_s"] for p in phases)
    good = sum(p["good"] or 0 for p in phases)
    return {"good": good, "duration_s": duration, "goodput": good / duration if duration else 0.0,
            "failed": sum(p["failed"] for p in phases), "completed": sum(p["completed"] for p in phases)}


def _switches(decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(a, t=d["t"]) for d in decisions for a in d["actions"] if a["kind"] == "switch"]


def timeline(results: dict[str, Any], out: Path) -> Path:
    from matplotlib.figure import Figure

    systems = results["systems"]
    fig = Figure(figsize=(10, 6.5), layout="tight")
    top, bottom = fig.subplots(2, 1, sharex=False, height_ratios=[3, 2])
    for s in systems:
        base = s["phases"][0]["started_at"]
        pts = [(t - base, ttft) for p in s["phases"] for t, ttft, ok in p["requests"] if ok]
        dots = top.scatter([x for x, _ in pts], [y for _, y in pts], s=8, label=s["system"], alpha=0.7)
        for p in s["phases"][1:]:
            top.axvline(p["started_at"] - base, color=dots.get_facecolor()[0], ls="--", lw=0.6)
    top.set(yscale="log", ylabel="TTFT (s)", xlabel="seconds since the trace started (each system's own)",
            title="every request's TTFT; dashed, in its color: a system's next phase starts")
    top.axhline(results["args"]["slo_ttft_ms"] / 1000, color="red", lw=0.8, label="TTFT SLO")
    top.legend(fontsize=8)
    planner = next((s for s in systems if s["system"] == "planner"), None)
    decisions = results.get("decisions", [])
    if planner is not None and decisions:
        base = planner["phases"][0]["started_at"]
        xs = [d["t"] - base for d in decisions]
        bottom.step(xs, [d["decision"]["prefill"] for d in decisions], where="post", label="prefill decided")
        bottom.step(xs, [d["workers"].get("prefill", 0) for d in decisions], where="post", ls=":",
                    label="prefill serving")
        for a in _switches(decisions):
            bottom.axvline(a["t"] - base, color="green" if a["ok"] else "red", lw=0.8)
            bottom.annotate(f" to {a['role']}: {a['seconds']:.1f} s", (a["t"] - base, 2.6), fontsize=7)
        for p in planner["phases"][1:]:
            bottom.axvline(p["started_at"] - base, color="grey", ls="--", lw=0.6)
        bottom.set(ylim=(0, 3.2), yticks=[0, 1, 2, 3], ylabel="prefill workers (of 3)",
                   xlabel="seconds since the planner's trace started",
                   title="planner: decisions and switches (green: a switch, its seconds; dashed: next phase)")
        ratio = bottom.twinx()
        ratio.plot(xs, [max(d["load"]["prompt_tokens"], 1) / max(d["load"]["output_tokens"], 1) for d in decisions],
                   color="grey", lw=0.8, alpha=0.6, label="predicted prompt / output tokens")
        ratio.set(yscale="log", ylabel="prompt / output tokens")
        bottom.legend(fontsize=8, loc="upper left")
        ratio.legend(fontsize=8, loc="upper right")
    else:
        bottom.set_axis_off()
    path = out / "timeline.png"
    fig.savefig(path, dpi=110)
    return path


def write_report(results: dict[str, Any], out: Path) -> str:
    args, systems = results["args"], results["systems"]
    lines = ["# Elastic PD: static splits vs the SLA planner", "",
             f"`python benchmarks/elastic.py{' --quick' if args.get('quick') else ''}`: 3 workers, phases of "
             f"{args['phase_requests']} requests: prefill-heavy ({args['prefill_heavy'][0]} in / "
             f"{args['prefill_heavy'][1]} out), decode-heavy ({args['decode_heavy'][0]} in / {args['decode_heavy'][1]} "
             f"out), prefill-heavy again; Poisson at {', '.join(f'{r:g}' for r in args['rates'])} req/s; SLOs TTFT "
             f"<= {args['slo_ttft_ms']:g} ms, TPOT <= {args['slo_tpot_ms']:g} ms; planner interval "
             f"{args['interval_s']:g} s; seed {args['seed']}.", "",
             "| system | phase | done | failed | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | within SLO | goodput |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in systems:
        for p in s["phases"]:
            lines.append(f"| {s['system']} | {p['phase']} | {p['completed']} | {p['failed']} | {p['ttft_p50']:.0f} | "
                         f"{p['ttft_p99']:.0f} | {p['itl_p50']:.0f} | {p['itl_p99']:.0f} | {p['good']} | "
                         f"{p['goodput'] or 0:.3f} |")
    lines += ["", "Latencies in ms; goodput: requests within both SLOs per second of the phase.", "",
              "## Whole trace", "", "| system | done | failed | within SLO | seconds | goodput |",
              "|---|---|---|---|---|---|"]
    whole = {s["system"]: _whole(s) for s in systems}
    for name, w in whole.items():
        lines.append(f"| {name} | {w['completed']} | {w['failed']} | {w['good']} | {w['duration_s']:.0f} | "
                     f"{w['goodput']:.4f} |")
    statics = [w["goodput"] for n, w in whole.items() if n.startswith("static")]
    if "planner" in whole and statics:
        best = max(statics)
        ratio = whole["planner"]["goodput"] / best if best else float("inf")
        lines += ["", f"Planner goodput / better static split: **{ratio:.2f}x** (target >= {GOODPUT_TARGET}x: "
                      f"{'MET' if ratio >= GOODPUT_TARGET else 'MISSED'})."]
    switches = _switches(results.get("decisions", []))
    if switches:
        lines += ["", "## Planner switches (drain + swap + re-register)", "",
                  "| to | worker | ok | seconds | drain | swap | register |", "|---|---|---|---|---|---|---|"]
        for a in switches:
            d = a.get("detail", {})
            lines.append(f"| {a['role']} | {a['url']} | {a['ok']} | {a['seconds']:.2f} | {d.get('drain_s', '-')} | "
                         f"{d.get('swap_s', '-')} | {d.get('register_s', '-')} |")
        worst = max(a["seconds"] for a in switches)
        failed = whole.get("planner", {}).get("failed", 0)
        lines += ["", f"Slowest switch {worst:.2f} s (target <= {SWITCH_TARGET_S:g} s: "
                      f"{'MET' if worst <= SWITCH_TARGET_S else 'MISSED'}); failed requests in the planner's trace: "
                      f"{failed} (target 0: {'MET' if failed == 0 else 'MISSED'})."]
    elif "planner" in whole:
        lines += ["", "The planner made no switch in this trace."]
    disc = next((s["discovery"] for s in systems if "discovery" in s), None)
    if disc:
        lines += ["", "## Discovery's costs", "",
                  f"- a new decode's first healthy answer -> the first request the router sends it: "
                  f"{disc['healthy_to_first_request_s']:.2f} s",
                  f"- kill -9 -> out of the router: {disc['kill_to_removed_s']:.2f} s (lease TTL "
                  f"{disc['lease_ttl_s']} s)"]
    lines += ["", f"![timeline]({timeline(results, out).name})"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text
