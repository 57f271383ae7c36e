"""The package's shape: imports point one way, no module pair imports each other (directly or
through a chain), and no product file outgrows 400 lines.

    router ──▶ (HTTP only)            server ──▶ engine ──▶ model
    disagg ──▶ (never engine/server/router)      engine ──▶ disagg
    model  ──▶ (nothing else of pdserve)
    kv_events ◀── engine, server, router  (the KV-event wire format; imports only msgspec/stdlib)
    discovery ◀── server, router          (etcd registration and watch; no torch, no engine)
    planner   ──▶ (no torch, engine, server, model, disagg: it reads metrics and decides)

Every import counts, also lazy ones inside functions and those under TYPE_CHECKING: a reader
follows them all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "pdserve"

FORBIDDEN = {  # folder → import prefixes its modules must not use
    "disagg": ("pdserve.engine", "pdserve.server", "pdserve.router"),
    "router": ("torch", "pdserve.engine", "pdserve.server", "pdserve.model"),
    "model": ("pdserve.engine", "pdserve.server", "pdserve.router", "pdserve.disagg", "pdserve.bench",
              "pdserve.launch", "pdserve.cli"),
    "parallel": ("pdserve.engine", "pdserve.server", "pdserve.router", "pdserve.disagg", "pdserve.model"),
    # bottom: router and server both import it (etcd3gw, stdlib, contract)
    "discovery": ("torch", "pdserve.engine", "pdserve.server", "pdserve.router", "pdserve.model", "pdserve.disagg",
                  "pdserve.launch", "pdserve.planner"),
    "planner": ("torch", "pdserve.engine", "pdserve.server", "pdserve.model", "pdserve.disagg"),
}
KV_EVENTS_ALLOWED = ("msgspec", "pdserve.kv_events", "__future__", "hashlib", "json", "struct", "dataclasses",
                     "typing")
PICKLING_MODULES = ("pickle", "cloudpickle", "dill", "_pickle")
PICKLING_CALLS = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                  "send_object_list", "recv_object_list")  # torch.distributed's pickling collectives


def _module_name(path: Path) -> str:
    parts = ("pdserve", *path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imported_names(path: Path) -> list[str]:
    """Absolute names of everything `path` imports (`from a import b` gives a and a.b)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names += [module] + [f"{module}.{a.name}" for a in node.names]
    return names


def _resolve(name: str) -> str | None:
    """The project module `name` refers to (the longest known prefix), if any."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _graph() -> dict[str, set[str]]:
    """module → project modules it imports (package __init__ files are namespaces, not edges)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for me, path in MODULES.items():
        for name in _imported_names(path):
            target = _resolve(name)
            if target and target != me and MODULES[target].name != "__init__.py":
                graph[me].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_import_direction(folder: str) -> None:
    bad = []
    for me, path in MODULES.items():
        if not me.startswith(f"pdserve.{folder}.") and me != f"pdserve.{folder}":
            continue
        for name in _imported_names(path):
            if any(name == p or name.startswith(p + ".") for p in FORBIDDEN[folder]):
                bad.append(f"{path.relative_to(PKG)} imports {name}")
    assert not bad, "\n".join(sorted(set(bad)))


def _pickling(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [n for n in names if n.split(".")[0] in PICKLING_MODULES]
        if isinstance(node, ast.Attribute) and (node.attr in PICKLING_CALLS or (
                node.attr == "load" and isinstance(node.value, ast.Name) and node.value.id == "torch")):
            found.append(node.attr if node.attr != "load" else "torch.load")
    return found


def test_nothing_pickles() -> None:
    """No socket or collective carries pickles: no pickle module, no torch.distributed *_object*
    collective, no torch.load anywhere in the package (msgspec/msgpack only)."""
    bad = [f"{p.relative_to(PKG)}: {w}" for p in MODULES.values() for w in _pickling(p)]
    assert not bad, "\n".join(bad)


def test_pickle_finder_finds_them(tmp_path: Path) -> None:  # the check itself can fail
    f = tmp_path / "m.py"
    f.write_text("import pickle\nimport torch.distributed as dist\ndist.broadcast_object_list([1])\ntorch.load('x')\n")
    assert set(_pickling(f)) == {"pickle", "broadcast_object_list", "torch.load"}


def test_no_import_circles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_chain() -> None:  # the check itself can fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_product_files_stay_small() -> None:
    long = [f"{p.relative_to(PKG)}: {n} lines" for p in MODULES.values()
            if (n := p.read_text().count("\n")) > 400]
    assert not long, "\n".join(long)


def test_kv_events_imports_only_msgspec_and_stdlib() -> None:
    """engine and router both import pdserve/kv_events: it must pull in neither of them (nor torch, zmq)."""
    bad = [f"{p.relative_to(PKG)} imports {n}" for m, p in MODULES.items() if m.startswith("pdserve.kv_events")
           for n in _imported_names(p) if not any(n == a or n.startswith(a + ".") for a in KV_EVENTS_ALLOWED)]
    assert not bad, "\n".join(bad)


CONTRACT_ALLOWED = KV_EVENTS_ALLOWED + ("pdserve.contract", "os", "collections.abc")


def _contract_words() -> set[str]:
    """The body fields and /server_info keys only the contract may spell. bootstrap_host and
    bootstrap_port are left out: they are also fields of the router's WorkerSpec and the server's
    DisaggConfig (a prefill's bootstrap address), which those configs own."""
    from pdserve.contract import BODY_FIELDS, BOOTSTRAP_HOST, BOOTSTRAP_PORT, ServerInfo

    info = {k for k in ServerInfo.__struct_fields__ if k.startswith(("disaggregation_", "kv_events"))}
    return ({name for name, _, _ in BODY_FIELDS} | info) - {BOOTSTRAP_HOST, BOOTSTRAP_PORT}


def _contract_spellings(path: Path, words: set[str]) -> list[str]:
    """Where `path` spells a contract name itself: a string literal that is one (or any
    `pdserve_*` field), or a class attribute declared under one (a hand-written request model)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value in words or (node.value.startswith("pdserve_") and node.value.isidentifier())):
            found.append(f"line {node.lineno}: {node.value!r}")
        if isinstance(node, ast.ClassDef):
            found += [f"line {a.lineno}: declares {a.target.id}" for a in node.body
                      if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and a.target.id in words]
    return found


def test_router_and_server_spell_no_contract_field() -> None:
    """The extra body fields and the /server_info keys router and server share are named once,
    in pdserve/contract; router/ and server/ use those names, never their own copy."""
    words = _contract_words()
    bad = [f"{p.relative_to(PKG)} {w}" for m, p in MODULES.items()
           if m.startswith(("pdserve.router.", "pdserve.server.")) for w in _contract_spellings(p, words)]
    assert not bad, "\n".join(bad)


def test_contract_finder_finds_them(tmp_path: Path) -> None:  # the check itself can fail
    f = tmp_path / "m.py"
    f.write_text("class B:\n    bootstrap_room: int = 0\n\nx = {'pdserve_resume_ids': 1, 'kv_events_endpoint': 2}\n"
                 "y = 'a pdserve_stream_ids sentence is prose'\n")
    assert len(_contract_spellings(f, _contract_words())) == 3


def test_contract_imports_only_msgspec_and_stdlib() -> None:
    """router and server both import pdserve/contract: it pulls in neither of them (nor torch)."""
    bad = [f"{p.relative_to(PKG)} imports {n}" for m, p in MODULES.items() if m.startswith("pdserve.contract")
           for n in _imported_names(p) if not any(n == a or n.startswith(a + ".") for a in CONTRACT_ALLOWED)]
    assert not bad, "\n".join(bad)


def test_only_cli_imports_launch() -> None:
    """launch/ is the top floor (it imports the router); the bottom helpers everyone shares live
    in flags/, so nothing but cli/ (and launch itself) imports launch/."""
    bad = [f"{p.relative_to(PKG)} imports {n}" for m, p in MODULES.items()
           if not m.startswith(("pdserve.cli", "pdserve.launch"))
           for n in _imported_names(p) if n == "pdserve.launch" or n.startswith("pdserve.launch.")]
    assert not bad, "\n".join(sorted(set(bad)))


def _disagg_submodules(names: list[str]) -> list[str]:
    """The `pdserve.disagg` submodules among imported names (the package's own names are its face)."""
    return [n for n in names if (target := _resolve(n)) is not None and target.startswith("pdserve.disagg.")]


def test_engine_sees_only_the_disagg_face() -> None:
    """The engine imports `pdserve.disagg` (its __init__: open_rooms, BootstrapClient, KVPoll, ...),
    never one of its submodules: how the transfer is laid out stays disagg's business."""
    bad = [f"{p.relative_to(PKG)} imports {n}" for m, p in MODULES.items() if m.startswith("pdserve.engine")
           for n in _disagg_submodules(_imported_names(p))]
    assert not bad, "\n".join(bad)


def test_disagg_face_finder_finds_submodules() -> None:  # the check itself can fail
    names = ["pdserve.disagg", "pdserve.disagg.KVPoll", "pdserve.disagg.transfer.base",
             "pdserve.disagg.transfer.base.KVPoll", "pdserve.disagg.bootstrap_client"]
    assert _disagg_submodules(names) == names[2:]


def test_disagg_face_names_load() -> None:
    """Every name the face lists resolves (they load lazily: a typo would only fail at first use)."""
    import pdserve.disagg as face

    missing = [n for n in face.__all__ if getattr(face, n, None) is None]
    assert not missing, missing


ENGINE_PROCESS_NAMES = ("engine_main", "spawn_engine_process")  # the engine process's entry and its spawn
ENGINE_ONLY_MODULES = ("pdserve.engine.engine", "pdserve.engine.process.engine_main", "pdserve.engine.kv_publisher")


def _engine_process_parts(path: Path) -> list[str]:
    """What of the engine process `path` holds: a class with "Loop" in its name, the entry or spawn
    function, a multiprocessing Process, an import of the Engine itself or the KV-event publisher."""
    found, names = [], []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:  # server/ imports absolutely
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ClassDef) and "Loop" in node.name:
            found.append(f"class {node.name}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in ENGINE_PROCESS_NAMES:
            found.append(f"def {node.name}")
        elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)) and \
                (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "Process":
            found.append(f"Process(...) at line {node.lineno}")
    found += [f"imports {n}" for n in names
              if any(n == m or n.startswith(m + ".") for m in ENGINE_ONLY_MODULES)]
    return found


def test_engine_process_is_not_in_server() -> None:
    """server/ is HTTP only: the engine process (its loop, entry, spawn, KV-event publisher) lives
    in engine/ (engine/process.py); the front only calls `spawn_engine_process` from there."""
    bad = [f"{p.relative_to(PKG)}: {w}" for m, p in MODULES.items()
           if m.startswith("pdserve.server.") for w in _engine_process_parts(p)]
    assert not bad, "\n".join(bad)


def test_engine_process_finder_finds_them(tmp_path: Path) -> None:  # the check itself can fail
    f = tmp_path / "m.py"
    f.write_text("import multiprocessing as mp\nfrom pdserve.engine.engine import Engine\n"
                 "class DPAttentionLoop:\n    pass\ndef engine_main():\n    mp.get_context('spawn').Process()\n")
    assert sorted(_engine_process_parts(f)) == ["Process(...) at line 6", "class DPAttentionLoop", "def engine_main",
                                                "imports pdserve.engine.engine", "imports pdserve.engine.engine.Engine"]
