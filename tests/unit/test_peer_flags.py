"""The flags vLLM's and SGLang's users type first (issue 31): each is accepted by `pdserve serve`,
sets what it means there or warns that it has no effect; a positional model; `launch` passes the
served name and tool parser to every server and its banner's curl names the model it serves."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from pdserve.cli import build_parser
from pdserve.engine.args import ENGINE_EXTRAS
from pdserve.flags.table import noop_warnings
from pdserve.server.serve import SERVE_FLAGS, config_from_args

# (argv, what it sets: (dotted field of ServerConfig, value)); None: accepted with a warning
TYPED = [
    (["-tp", "2"], ("engine.parallel.tp_size", 2)),
    (["-dp", "2"], ("engine.parallel.dp_size", 2)),
    (["--tensor-parallel-size", "2"], ("engine.parallel.tp_size", 2)),
    (["--enable-prefix-caching"], ("engine.enable_prefix_cache", True)),
    (["--no-enable-prefix-caching"], ("engine.enable_prefix_cache", False)),
    (["--dtype", "auto"], ("engine.dtype", "auto")),
    (["--dtype", "half"], ("engine.dtype", "half")),
    (["--dtype", "bfloat16"], ("engine.dtype", "bfloat16")),
    (["--dtype", "float32"], ("engine.dtype", "float32")),
    (["--gpu-memory-utilization", "0.8"], ("engine.gpu_memory_utilization", 0.8)),
    (["--mem-fraction-static", "0.7"], ("engine.mem_fraction_static", 0.7)),
    (["--tool-call-parser", "qwen25"], ("tool_call_parser", "qwen25")),
    (["--tool-call-parser", "llama3"], ("tool_call_parser", "llama3")),
    (["--served-model-name", "my-model"], ("served_model_name", "my-model")),
    (["--allowed-origins", '["http://localhost:3000"]'], ("cors.allowed_origins", ("http://localhost:3000",))),
    (["--trust-remote-code"], None),
    (["--enable-metrics"], None),
    (["--enable-auto-tool-choice"], None),
]


def _field(config: object, dotted: str) -> object:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


@pytest.mark.parametrize(("argv", "sets"), TYPED, ids=[" ".join(a) for a, _ in TYPED])
def test_each_typed_flag_is_accepted(argv: list[str], sets: tuple[str, object] | None) -> None:
    args = build_parser().parse_args(["serve", *argv])
    config = config_from_args(args)
    warnings = noop_warnings(args, SERVE_FLAGS + ENGINE_EXTRAS)
    if sets is None:
        assert len(warnings) == 1 and warnings[0].startswith(argv[0] + " has no effect: "), warnings
    else:
        assert _field(config, sets[0]) == sets[1] and warnings == []


def test_positional_model_is_the_model() -> None:
    for cmd in (["serve", "Qwen/Qwen2.5-0.5B-Instruct"], ["serve", "Qwen/Qwen2.5-0.5B-Instruct", "-tp", "1"]):
        assert config_from_args(build_parser().parse_args(cmd)).engine.model == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(ValueError, match="given twice"):
        config_from_args(build_parser().parse_args(["serve", "a/b", "--model", "c/d"]))


def test_launch_passes_name_and_parser_and_its_banner_names_the_model(tmp_path: Path) -> None:
    from pdserve.launch.cluster import Cluster

    argv = ["launch", "--mode", "unified", "--served-model-name", "smol", "--tool-call-parser", "hermes"]
    cluster = Cluster(build_parser().parse_args(argv), tmp_path)
    for server in cluster.servers:
        cmd = server.cmd
        assert cmd[cmd.index("--served-model-name") + 1] == "smol"
        assert cmd[cmd.index("--tool-call-parser") + 1] == "hermes"
    curl = next(line for line in cluster.banner().splitlines() if "curl" in line)
    body = json.loads(shlex.split(curl.strip())[shlex.split(curl.strip()).index("-d") + 1])
    assert body["model"] == "smol"
    hub = Cluster(build_parser().parse_args(["launch", "org/some-model", "--mode", "unified"]), tmp_path)
    assert hub.model_name == "org/some-model" and '"model": "org/some-model"' in hub.banner()
    assert "--served-model-name" not in hub.servers[0].cmd


def test_router_help_documents_the_admin_routes() -> None:
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["router", "--help"])
    assert "/add_worker" in out.getvalue()


def test_a_missing_transfer_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    from pdserve.launch.cluster import preflight as launch_preflight
    from pdserve.server.serve import preflight as serve_preflight

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith(("nixl", "mooncake")) else real(name, *a))
    for backend in ("nixl", "mooncake"):
        for start, argv in ((serve_preflight, ["serve", "--disaggregation-mode", "decode"]),
                            (launch_preflight, ["launch"])):
            args = build_parser().parse_args([*argv, "--disaggregation-transfer-backend", backend])
            with pytest.raises(ValueError) as e:
                start(args)
            line = str(e.value)
            assert "\n" not in line and f"pdserve[{backend}]" in line, line
