"""The command line: SGLang/vLLM aliases set pdserve's fields, help is complete and light,
values are checked at parse time, start-up checks fail in one line with exit code 2."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pdserve.cli import build_parser
from pdserve.engine.args import ENGINE_FLAGS, engine_config_from_args

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = {  # a non-default value per EngineConfig field, as typed on the command line
    "device": "cpu", "dtype": "bfloat16", "page_size": "32", "kv_cache_gb": "0.25", "num_pages": "77",
    "mem_fraction_static": "0.5", "max_model_len": "333", "max_running": "7", "chunk_budget": "96",
    "decode_headroom": "0.25", "threads": "3", "max_top_logprobs": "5", "seed": "123",
    "tokenizer": "/some/tokenizer", "chat_template": "{{ messages }}", "log_stats_interval_s": "2.5",
    "tp_size": "2", "nnodes": "2", "node_rank": "1", "dist_init_addr": "10.0.0.1:5000",
    "dp_size": "2", "ep_size": "2", "load_balance_method": "shortest_queue",
    "kv_events_config": '{"endpoint": "tcp://127.0.0.1:5557"}', "revision": "v1.0", "download_dir": "/some/hf-cache",
    "gpu_memory_utilization": "0.8",
    "attention_backend": "torch_native", "quantization": "fp16",
}


def _serve(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_every_engine_field_has_a_sample() -> None:
    assert {f.field for f in ENGINE_FLAGS} == set(SAMPLE)


@pytest.mark.parametrize("flag", ENGINE_FLAGS, ids=lambda f: f.names[0])
def test_each_alias_sets_the_same_field(flag) -> None:
    own = engine_config_from_args(_serve([flag.names[0], SAMPLE[flag.field]]))
    default = engine_config_from_args(_serve([]))
    assert getattr(own, flag.field) != getattr(default, flag.field)
    assert getattr(own, flag.field) == flag.type(SAMPLE[flag.field])
    for alias in flag.names[1:]:
        assert engine_config_from_args(_serve([alias, SAMPLE[flag.field]])) == own, alias


def test_named_aliases_exist() -> None:
    names = {n for f in ENGINE_FLAGS for n in f.names}
    for alias in ("--context-length", "--max-running-requests", "--max-num-seqs", "--chunked-prefill-size",
                  "--max-num-batched-tokens", "--random-seed", "--mem-fraction-static", "--tokenizer",
                  "--chat-template"):
        assert alias in names


def test_enable_expert_parallel_is_ep_over_the_tp_ranks() -> None:
    cfg = engine_config_from_args(_serve(["--tp-size", "2", "--enable-expert-parallel"]))
    assert cfg.parallel.ep_ranks == 2 == engine_config_from_args(_serve(["--tp-size", "2", "--ep-size", "2"])).ep_ranks
    assert engine_config_from_args(_serve(["--tp-size", "2"])).parallel.ep_ranks == 1


@pytest.mark.parametrize("alias", ["--disable-prefix-cache", "--disable-radix-cache", "--no-enable-prefix-caching"])
def test_prefix_cache_off_aliases(alias: str) -> None:
    assert engine_config_from_args(_serve([])).enable_prefix_cache
    assert not engine_config_from_args(_serve([alias])).enable_prefix_cache


def test_model_path_alias_and_chat_template_file(tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    cfg = engine_config_from_args(_serve(["--model-path", "x.gguf", "--chat-template", str(template)]))
    assert cfg.model == "x.gguf"
    assert cfg.chat_template == template.read_text()  # a file is read; inline text stays as is


@pytest.mark.parametrize("argv", [
    ["serve", "--dtype", "float64"], ["serve", "--page-size", "0"], ["serve", "--mem-fraction-static", "1.5"],
    ["serve", "--device", "gpu"], ["serve", "--port", "70000"], ["serve", "--disaggregation-mode", "both"],
    ["router", "--policy", "fastest"], ["router", "--retry-jitter-factor", "2"],
    ["launch", "--policy", "fastest"], ["launch", "--transfer-backend", "carrier-pigeon"],
    ["launch", "--prefill", "0"], ["bench", "--base-url", "http://x", "--num-prompts", "-1"],
])
def test_bad_values_fail_at_parse_time(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"pdserve": parser, **sub.choices}


@pytest.mark.parametrize("name", ["pdserve", "generate", "convert", "serve", "router", "launch", "bench"])
def test_every_flag_has_help_and_no_none_default(name: str) -> None:
    parser = _all_parsers()[name]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or not action.option_strings:
            continue
        assert action.help and action.help.strip(), f"{name} {action.option_strings} has no help"
    text = parser.format_help()
    assert "default None" not in text and "default: None" not in text, text


def test_help_and_version_import_no_torch() -> None:
    code = textwrap.dedent("""
        import contextlib, io, sys
        from pdserve.cli import main
        for argv in (["--help"], ["serve", "--help"], ["router", "--help"], ["launch", "--help"],
                     ["bench", "--help"], ["generate", "--help"], ["convert", "--help"], ["planner", "--help"],
                     ["profile", "--help"], ["--version"]):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    main(argv)
                except SystemExit as e:
                    assert e.code == 0, (argv, e.code)
            assert out.getvalue().strip(), argv
        heavy = sorted(m for m in ("torch", "transformers", "uvicorn", "fastapi", "numpy") if m in sys.modules)
        print("HEAVY", heavy)
    """)
    r = _run("-c", code)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout[-500:]


def test_python_m_pdserve_help_and_version() -> None:
    r = _run("-m", "pdserve", "--help")
    assert r.returncode == 0 and "serve" in r.stdout and "bench" in r.stdout
    r = _run("-m", "pdserve", "--version")
    assert r.returncode == 0 and r.stdout.startswith("pdserve ")


def test_bad_model_exits_2_with_one_line(tmp_path: Path) -> None:
    r = _run("-m", "pdserve", "serve", "--model", str(tmp_path / "no-such-model"), "--port", "0")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-model" in lines[0] and "does not exist" in lines[0], r.stderr


def _model_folder(tmp_path: Path, **config: object) -> Path:
    """A tiny Llama's config.json (changed by `config`) in a folder without weights."""
    import json

    tiny = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**tiny, **config}))
    return folder


def test_unsupported_architecture_exits_2_with_one_line(tmp_path: Path) -> None:
    """Checked before any process spawns (it once ended in uvicorn's 'Application startup failed' traceback)."""
    folder = _model_folder(tmp_path, architectures=["MambaForCausalLM"])
    for argv in (["serve", "--model", str(folder), "--port", "0"], ["launch", "--model", str(folder)]):
        r = _run("-m", "pdserve", *argv)
        assert r.returncode == 2, (argv, r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "MambaForCausalLM" in lines[0] and "unsupported" in lines[0], r.stderr


def test_engine_that_cannot_start_exits_2_with_one_line(tmp_path: Path) -> None:
    """A model whose config passes the start-up checks but whose engine fails (no weights): the
    engine's error in one line, exit 2, no traceback."""
    folder = _model_folder(tmp_path)
    r = _run("-m", "pdserve", "serve", "--model", str(folder), "--port", "0", "--log-level", "error", timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and "startup failed" not in r.stderr, r.stderr[-2000:]
    assert lines[-1].startswith("pdserve serve: error: "), r.stderr[-2000:]


@pytest.mark.parametrize("cmd", ["serve", "router", "launch"])
def test_unknown_flag_is_one_line(cmd: str) -> None:
    r = _run("-m", "pdserve", cmd, "--no-such-flag")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--no-such-flag" in lines[0] and "usage" not in lines[0], r.stderr


def test_taken_port_exits_2_with_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run("-m", "pdserve", "serve", "--port", str(port))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], r.stderr


@pytest.mark.parametrize("argv, words", [
    (["serve", "--mem-fraction-static", "0.5", "--num-pages", "100"], "--mem-fraction-static"),
    (["serve", "--max-model-len", "4096", "--num-pages", "10", "--page-size", "16"], "does not fit"),
    (["serve", "--chat-template", "no_such_template_file.jinja"], "neither a file"),
    (["serve", "--disaggregation-mode", "prefill", "--port", "18998", "--disaggregation-bootstrap-port", "18998"],
     "bootstrap"),
    (["serve", "--disaggregation-decode-enable-radix-cache"], "--disaggregation-mode decode only"),
    (["serve", "--disaggregation-mode", "prefill", "--disaggregation-decode-enable-radix-cache"], "decode only"),
    (["serve", "--disaggregation-mode", "decode", "--disaggregation-decode-enable-radix-cache",
      "--disable-radix-cache"], "needs the radix cache"),
    (["launch", "--model", "/no/such/model"], "does not exist"),
    (["router", "--prefill", "http://127.0.0.1:1"], "--pd-disaggregation"),
    (["router", "--discovery", "http://127.0.0.1:2379"], "etcd://HOST:PORT"),
    (["serve", "--discovery", "etcd://127.0.0.1:2379", "--discovery-ttl", "1"], "TTL"),
])
def test_bad_combinations_exit_2_with_one_line(argv: list[str], words: str) -> None:
    r = _run("-m", "pdserve", *argv)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr


def test_launch_tp_flags_reach_each_role(tmp_path: Path) -> None:
    """`launch --prefill-tp 2 --decode-tp 1`: the prefill gets --tp-size 2 and half the threads per
    rank; the decode gets no --tp-size; `--tp` sizes unified workers."""
    from pdserve.launch.cluster import Cluster

    args = build_parser().parse_args(["launch", "--prefill-tp", "2"])
    prefill, decode = Cluster(args, tmp_path).servers
    assert prefill.cmd[prefill.cmd.index("--tp-size") + 1] == "2" and "--tp-size" not in decode.cmd
    # the two ranks share the prefill's cores: threads per rank is half its share
    assert int(prefill.cmd[prefill.cmd.index("--threads") + 1]) == max(1, len(prefill.cpus) // 2)
    assert int(decode.cmd[decode.cmd.index("--threads") + 1]) == max(1, len(decode.cpus))
    args = build_parser().parse_args(["launch", "--mode", "unified", "--tp", "3"])
    (unified,) = (c.cmd for c in Cluster(args, tmp_path).servers)
    assert unified[unified.index("--tp-size") + 1] == "3"
    with pytest.raises(ValueError, match="--tp-size"):
        from pdserve.launch.cluster import preflight
        preflight(build_parser().parse_args(["launch", "--server-args", "--tp-size 2"]))


def test_decode_radix_cache_flag_reaches_decode_servers_only(tmp_path: Path) -> None:
    from pdserve.launch.cluster import Cluster
    from pdserve.server.serve import config_from_args

    flag = "--disaggregation-decode-enable-radix-cache"
    prefill, decode = Cluster(build_parser().parse_args(["launch", flag]), tmp_path).servers
    assert flag in decode.cmd and flag not in prefill.cmd
    prefill, decode = Cluster(build_parser().parse_args(["launch"]), tmp_path).servers
    assert flag not in decode.cmd
    assert config_from_args(_serve(["--disaggregation-mode", "decode", flag])).disagg.decode_enable_radix_cache
    assert not config_from_args(_serve(["--disaggregation-mode", "decode"])).disagg.decode_enable_radix_cache
    from pdserve.launch.cluster import preflight
    for argv in (["--mode", "unified", flag], [f"--server-args={flag}"]):
        with pytest.raises(ValueError, match=flag):
            preflight(build_parser().parse_args(["launch", *argv]))


def test_launch_discovery_wires_etcd_servers_and_router(tmp_path: Path) -> None:
    """`launch --discovery`: a local etcd child first, every server registers in it (decodes get a
    bootstrap port for a later switch to prefill), the router follows it instead of a worker list;
    `--discovery URL` uses that etcd; without it the shape is fixed as before."""
    from pdserve.launch.cluster import Cluster

    local = Cluster(build_parser().parse_args(["launch", "--discovery", "--decode", "2"]), tmp_path)
    assert local.etcd is not None and local.children[0] is local.etcd and local.discovery is not None
    assert local.discovery.startswith("etcd://127.0.0.1:") and "--data-dir" in local.etcd.cmd
    for s in local.servers:
        assert s.cmd[s.cmd.index("--discovery") + 1] == local.discovery
        assert "--disaggregation-bootstrap-port" in s.cmd
    assert local.router is not None
    rcmd = local.router.cmd
    assert rcmd[rcmd.index("--discovery") + 1] == local.discovery and "--prefill" not in rcmd and "--decode" not in rcmd
    given = Cluster(build_parser().parse_args(["launch", "--discovery", "etcd://10.0.0.5:2379/team"]), tmp_path)
    assert given.etcd is None and given.discovery == "etcd://10.0.0.5:2379/team"
    fixed = Cluster(build_parser().parse_args(["launch"]), tmp_path)
    assert fixed.etcd is None and "--discovery" not in fixed.router.cmd and "--prefill" in fixed.router.cmd  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="--discovery"):
        from pdserve.launch.config import config_from_args
        config_from_args(build_parser().parse_args(["launch", "--discovery", "http://nope"]))
