"""Frozen configuration of `pdserve launch` and its flag table (pdserve/flags): every knob with
its default, built once from the command line (`config_from_args`), read by cluster.py."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pdserve.contract import API_KEY_ENV, DEFAULT_ROUTER_PORT, resolve_api_key
from pdserve.disagg.backends import BACKENDS
from pdserve.disagg.config import DECODE_RADIX_FLAG, check_decode_radix_cache
from pdserve.discovery import parse_discovery_url
from pdserve.flags.argtypes import port_number, positive_float, positive_int
from pdserve.flags.table import Flag, flag_values, with_values
from pdserve.router.config import POLICIES

MODES = ("pd", "unified")
STORE_BACKENDS = ("file", "mooncake")  # engine/config.py's HICACHE_BACKENDS (launch imports no engine)
LOCAL_ETCD = "local"  # `--discovery` given bare


@dataclass(frozen=True)
class LaunchConfig:
    mode: str = "pd"  # pd: prefill + decode servers behind the router; unified: plain load balancing
    prefill: int = 1  # prefill servers (pd)
    decode: int = 1  # decode servers (pd)
    workers: int = 1  # unified servers (unified)
    prefill_tp: int = 1  # tensor-parallel ranks of each prefill server
    decode_tp: int = 1  # ... of each decode server (may differ from prefill_tp)
    tp: int = 1  # ... of each unified server
    model: str = "default"  # for every server; "default" is the bundled SmolLM2-135M
    served_model_name: tuple[str, ...] = ()  # every server's --served-model-name (default: the model's name)
    tool_call_parser: str | None = None  # every server's --tool-call-parser (default: the model family's)
    host: str = "127.0.0.1"  # the router's bind address
    port: int = DEFAULT_ROUTER_PORT  # the router's port; 0 = a free one
    policy: str = "cache_aware"  # the router's policy
    transfer_backend: str = "tcp"  # PD KV transfer backend
    decode_radix_cache: bool = False  # pd: decode servers keep a prefix cache
    threads: int | None = None  # torch threads per server; None = the cores it is pinned to
    pin: bool = True  # pin each server to its cores
    api_key: str | None = None  # for the router and the servers
    log_dir: Path | None = None  # None = a new temp folder
    start_timeout_s: float = 600.0
    stop_timeout_s: float = 30.0  # each process's to stop
    discovery: str | None = None  # "local": start an etcd here; an etcd:// URL: use that one; None: a fixed shape
    server_args: str = ""  # extra flags for every `pdserve serve`
    router_args: str = ""  # extra flags for `pdserve router`
    hicache_storage_backend: str | None = None  # KV tiers' shared store for every server (launch/kv_store.py)
    hicache_storage_backend_extra_config: str | None = None  # its JSON (mooncake: none starts a master here)
    hicache_store_gb: float = 4.0  # mooncake: the memory launch's store holder gives the store

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}")
        check_decode_radix_cache(self.decode_radix_cache, "decode" if self.mode == "pd" else "null")
        if self.hicache_storage_backend_extra_config is not None and self.hicache_storage_backend is None:
            raise ValueError("--hicache-storage-backend-extra-config needs --hicache-storage-backend")
        if self.discovery not in (None, LOCAL_ETCD):
            parse_discovery_url(self.discovery)  # ValueError with one line


LAUNCH_FLAGS: tuple[Flag, ...] = (
    Flag(("--mode",), "mode", str, "pd: prefill + decode servers behind the router; unified: plain load balancing",
         MODES),
    Flag(("--prefill",), "prefill", positive_int, "prefill servers in pd mode"),
    Flag(("--decode",), "decode", positive_int, "decode servers in pd mode"),
    Flag(("--workers",), "workers", positive_int, "unified servers in unified mode"),
    Flag(("--prefill-tp",), "prefill_tp", positive_int, "tensor-parallel ranks of each prefill server"),
    Flag(("--decode-tp",), "decode_tp", positive_int,
         "tensor-parallel ranks of each decode server; may differ from --prefill-tp"),
    Flag(("--tp", "--tp-size"), "tp", positive_int, "tensor-parallel ranks of each unified server"),
    Flag(("--model", "--model-path"), "model", str,
         "model for every server: HF folder, .gguf, Hub id org/name, 'default' (the bundled SmolLM2-135M); "
         "also positional: pdserve launch MODEL"),
    Flag(("--served-model-name",), "served_model_name", str, "names requests may use (every server's)",
         nargs="+", shown="the model's name"),
    Flag(("--tool-call-parser",), "tool_call_parser", str, "every server's tool-call parser for tool_choice auto "
         "(pdserve serve --help lists them)", shown="chosen from the model's family", metavar="PARSER"),
    Flag(("--host",), "host", str, "router bind address"),
    Flag(("--port",), "port", port_number, "router port; 0: a free one"),
    Flag(("--policy",), "policy", str, "router policy", POLICIES),
    Flag(("--transfer-backend", "--disaggregation-transfer-backend"), "transfer_backend", str,
         "PD KV transfer backend", tuple(BACKENDS)),
    Flag((DECODE_RADIX_FLAG,), "decode_radix_cache", None,
         "pd mode: decode servers keep a prefix cache; only KV past its hit moves", shown="off"),
    Flag(("--threads",), "threads", positive_int, "torch threads per server", shown="the cores it is pinned to"),
    Flag(("--no-pin",), "pin", None, "do not pin servers to cores", const=False),
    Flag(("--api-key",), None, str, "key for the router and the servers", shown=f"${API_KEY_ENV}, else none"),
    Flag(("--log-dir",), "log_dir", Path, "folder for the logs", shown="a new temp folder"),
    Flag(("--start-timeout",), "start_timeout_s", positive_float, "seconds to wait for everything to be ready"),
    Flag(("--stop-timeout",), "stop_timeout_s", positive_float, "seconds each process gets to stop"),
    Flag(("--discovery",), "discovery", str, "servers register in etcd and the router follows it (workers may then "
         "come, go and switch roles: `pdserve planner`); bare: start a local etcd (etcd-server) on free ports",
         metavar="etcd://HOST:PORT[/PREFIX]", nargs="?", const=LOCAL_ETCD, shown="off: a fixed shape"),
    Flag(("--server-args",), "server_args", str, "extra flags for every `pdserve serve`, one string",
         shown="none"),
    Flag(("--router-args",), "router_args", str, "extra flags for `pdserve router`, one string", shown="none"),
    Flag(("--hicache-storage-backend",), "hicache_storage_backend", str,
         "KV tiers for every server with this shared store; mooncake: launch runs a mooncake_master and a store "
         "holder (127.0.0.1) and stops them with the cluster", STORE_BACKENDS, shown="none"),
    Flag(("--hicache-storage-backend-extra-config",), "hicache_storage_backend_extra_config", str,
         "the store's JSON (file: {\"path\": DIR}, default a folder in --log-dir; mooncake: a "
         "master_server_address uses that store instead of starting one)", metavar="JSON"),
    Flag(("--hicache-store-gb",), "hicache_store_gb", positive_float,
         "mooncake: memory of the store holder launch starts (the store's capacity)"),
)


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    values = flag_values(args, LAUNCH_FLAGS, LaunchConfig())
    tag = getattr(args, "model_tag", None)
    if tag is not None:
        if args.model is not None and args.model != tag:
            raise ValueError(f"the model is given twice: {tag!r} and --model {args.model!r}")
        values["model"] = tag
    return with_values(LaunchConfig(), {**values, "api_key": resolve_api_key(args.api_key)})
