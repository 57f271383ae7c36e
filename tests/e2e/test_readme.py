"""The README's "Set up" and "Use" commands, run as written on a fresh copy of the repository.

The copy holds the tracked files only (no venv, no stamps, no build output). To stay cheap it
runs against the environment already installed here: its `.venv` is made with
`--system-site-packages`, so the Makefile's install steps run for real but find everything
present. Each command runs as the README spells it, with three substitutions a shared test
machine needs: every port it names becomes a free one (a server command that names none gets
`--port FREE`), `path/to/model.gguf` becomes the bundled GGUF, and `make test` runs one test
file (`TESTS=...`: the whole suite would run this test again). A command that keeps running (a
server, a router, `launch`, `make run`) is started, waited for (its ready line or /health), the
commands after it are run against it (the README's curl; a launch banner's own curl), and it is
stopped with Ctrl-C (SIGINT to its process group), which must leave nothing running.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ROOT, free_port

README = ROOT / "README.md"
START_S = float(os.environ.get("PDSERVE_TEST_START_TIMEOUT", "600"))
SERVERS = ("pdserve serve", "pdserve launch", "pdserve router", "make run")


def blocks(section: str, lang: str) -> list[str]:
    """The fenced `lang` blocks of README section `section` (up to the next `## `)."""
    text = README.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(rf"```{lang}\n(.*?)```", text[start:end if end > 0 else None], re.S)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    out, cur = [], ""
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line) if not line.lstrip().startswith("#") else ""
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip():
            out.append(cur.strip())
        cur = ""
    return out


class Walk:
    def __init__(self, clone: Path, gguf: Path) -> None:
        self.clone, self.gguf = clone, gguf
        self.ports: dict[str, str] = {}
        self.env = dict(os.environ, PATH=f"{clone / '.venv' / 'bin'}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
        self.env.pop("PYTHONPATH", None)  # the copy's own code, through its venv's editable install

    def port(self, number: str) -> str:
        return self.ports.setdefault(number, str(free_port()))

    def substitute(self, cmd: str) -> str:
        cmd = re.sub(r"(--port |localhost:|127\.0\.0\.1:)(\d{4,5})", lambda m: m.group(1) + self.port(m.group(2)), cmd)
        cmd = re.sub(r"(--prefill \S+ )(\d{4,5})", lambda m: m.group(1) + self.port(m.group(2)), cmd)
        cmd = cmd.replace("path/to/model.gguf", str(self.gguf))
        if cmd.startswith("make run"):
            cmd += f" RUN_ARGS='--port {self.port('make-run')}'"
        elif cmd.startswith("make test"):
            cmd += " TESTS=tests/unit/test_flags.py"
        elif cmd.startswith(SERVERS) and "--port" not in cmd:
            cmd += f" --port {self.port(cmd)}"
        return cmd

    def run(self, cmd: str, timeout: float = 900) -> str:
        r = subprocess.run(cmd, shell=True, cwd=self.clone, env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    def start(self, cmd: str) -> tuple[subprocess.Popen[str], Path]:
        log = self.clone / f"walk-{len(list(self.clone.glob('walk-*')))}.log"
        proc = subprocess.Popen(cmd, shell=True, cwd=self.clone, env=self.env, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True, text=True)
        return proc, log

    def wait_ready(self, cmd: str, proc: subprocess.Popen[str], log: Path) -> str:
        """Until the server is up: launch's banner, serve's /health, the router's /health."""
        url = None
        port = re.search(r"--port (\d+)", cmd)
        if cmd.startswith(("pdserve serve", "pdserve router")) and port is not None:
            url = f"http://127.0.0.1:{port.group(1)}/health"
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{cmd} exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            text = log.read_text(errors="replace")
            if url is None and "Ctrl-C stops everything." in text:
                return text
            if url is not None:
                try:
                    if httpx.get(url, timeout=5).status_code == 200:
                        return text
                except httpx.HTTPError:
                    pass
            time.sleep(1)
        raise TimeoutError(f"{cmd} not ready after {START_S:.0f} s:\n{log.read_text()[-4000:]}")

    @staticmethod
    def ctrl_c(proc: subprocess.Popen[str], log: Path) -> None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"Ctrl-C did not stop it:\n{log.read_text()[-3000:]}") from None
        # the shell `proc` runs the command in dies at once; what it started shuts down on its own time
        # (as after Ctrl-C in a terminal): everything in the group must be gone within a bound
        deadline = time.monotonic() + 60
        while True:
            left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not left, f"left running 60 s after Ctrl-C: {left}\n{log.read_text()[-3000:]}"


def check_answer(out: str) -> None:
    import json

    body = json.loads(out)
    assert body["choices"][0]["message"]["content"], body


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path) -> Walk:
    from pdserve.model.bundled import bundled_gguf_path

    clone = tmp_path_factory.mktemp("readme") / "pdserve"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    clone.mkdir()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            (clone / name).write_bytes(src.read_bytes())
            os.chmod(clone / name, src.stat().st_mode)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(clone / ".venv")], check=True)
    return Walk(clone, bundled_gguf_path())


def walk_block(walk: Walk, cmds: list[str]) -> None:
    server = None
    for raw in cmds:
        cmd = walk.substitute(raw)
        if server is not None and not cmd.startswith("curl"):  # what it served is done with
            walk.ctrl_c(*server)
            server = None
        if cmd.startswith(SERVERS):
            proc, log = walk.start(cmd)
            text = walk.wait_ready(cmd, proc, log)
            server = (proc, log)
            banner = re.search(r"^\s*(curl .*)$", text, re.M)
            if banner:  # launch prints a curl that must work for the model it serves
                check_answer(walk.run(banner.group(1), timeout=600))
        elif cmd.startswith("curl") and "chat/completions" in cmd:
            check_answer(walk.run(cmd, timeout=600))
        else:
            out = walk.run(cmd)
            assert out.strip() or not cmd.startswith("pdserve generate"), cmd
    if server is not None:
        walk.ctrl_c(*server)


def test_set_up_commands(walk: Walk) -> None:
    (block,) = blocks("Set up", "bash")
    cmds = commands(block)
    assert cmds == ["make run", "make test"], cmds
    walk_block(walk, cmds)
    venv = walk.clone / ".venv" / "bin" / "python"
    where = walk.run(f"{venv} -c 'import pdserve; print(pdserve.__file__)'").strip()
    assert where.startswith(str(walk.clone)), where  # the copy's code, installed into its own venv


def test_use_commands(walk: Walk) -> None:
    (shell, *_), (python,) = blocks("Use", "bash"), blocks("Use", "python")
    cmds = commands(shell)
    assert any(c.startswith("pdserve serve") for c in cmds) and any(c.startswith("curl") for c in cmds)
    if not (walk.clone / ".venv" / "bin" / "pdserve").exists():  # "Set up" comes first (run alone: set up)
        walk.run("make setup")
    walk_block(walk, cmds)
    out = subprocess.run([str(walk.clone / ".venv" / "bin" / "python"), "-c", python], cwd=walk.clone, env=walk.env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-3000:]
