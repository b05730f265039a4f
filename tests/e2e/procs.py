"""Start and stop real processes for end-to-end tests.

Every server listens on 127.0.0.1 (or a unix socket) and is stopped by its own PID:
SIGTERM, wait, SIGKILL after a timeout. Nothing is ever signalled that these helpers did not
start. Children also get ``PR_SET_PDEATHSIG`` = SIGTERM, so they go away if the test runner
dies without cleaning up (the signal follows the *thread* that started them, so start them
from the event loop's thread, as pytest-asyncio does).

All network access of the tools stays on this machine: the daemons and skopeo get an
``HTTP(S)_PROXY`` pointing to a closed loopback port, so a request to any non-loopback host
(e.g. docker.io when a mirror fails) is refused locally instead of leaving the machine.
Go never proxies loopback addresses, so 127.0.0.1 traffic is direct.
"""

# These helpers bound subprocess lifetimes with explicit ``timeout`` arguments, poll PIDs that
# are not our children (no waitpid/event to await), and do small file I/O in coroutines.
# ruff: noqa: ASYNC109, ASYNC110, ASYNC240

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

DOCKER_REGISTRY_BIN = "/usr/bin/docker-registry"
DOCKERD_BIN = "/usr/sbin/dockerd"
SKOPEO_BIN = "skopeo"
# A port nothing listens on: outbound proxy for the tools, so off-machine requests fail fast.
DEAD_PROXY = "http://127.0.0.1:9"
LOOPBACK_NO_PROXY = "127.0.0.1,localhost,::1"
# sun_path is 108 bytes; keep our socket paths well below it.
MAX_SOCKET_PATH = 100

_PR_SET_PDEATHSIG = 1

RunResult = tuple[int, str, str]


class ProcessError(RuntimeError):
    """A helper process failed to start or a command failed."""


# -- ports and HTTP readiness ----------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def wait_http(
    url: str,
    timeout: float = 30.0,
    *,
    alive: Callable[[], bool] | None = None,
    connector: Callable[[], aiohttp.BaseConnector] | None = None,
) -> int:
    """Poll ``url`` with GET until anything answers; return the HTTP status.

    Raises ``TimeoutError`` after ``timeout`` seconds, or :class:`ProcessError` as soon as
    ``alive()`` turns false (the server died). ``connector`` makes a connector per attempt
    (e.g. ``lambda: aiohttp.UnixConnector(path=...)`` for a unix socket).
    """
    deadline = time.monotonic() + timeout
    delay = 0.05
    last_error: BaseException | None = None
    while True:
        if alive is not None and not alive():
            raise ProcessError(f"process serving {url} exited before it answered")
        try:
            return await _get_status(url, connector() if connector else None)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url} did not answer in {timeout}s: {last_error!r}")
        await asyncio.sleep(delay)
        # A refused connection costs next to nothing: poll often, so a server that is up is
        # seen within 0.1 s (a 0.5 s cap wasted ~0.25 s of every start, hundreds of them).
        delay = min(delay * 2, 0.1)


async def _get_status(url: str, connector: aiohttp.BaseConnector | None) -> int:
    client_timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session,
        session.get(url, allow_redirects=False) as resp,
    ):
        return resp.status


# -- process lifecycle -----------------------------------------------------------------------


def _set_pdeathsig() -> None:
    """preexec_fn: SIGTERM the child when the process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without DOCKER_*/proxy settings, plus the loopback guard."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("DOCKER_") and not k.lower().endswith("_proxy")
    }
    env.update(
        {
            "HTTP_PROXY": DEAD_PROXY,
            "HTTPS_PROXY": DEAD_PROXY,
            "http_proxy": DEAD_PROXY,
            "https_proxy": DEAD_PROXY,
            "NO_PROXY": LOOPBACK_NO_PROXY,
            "no_proxy": LOOPBACK_NO_PROXY,
        }
    )
    env.update(extra or {})
    return env


@dataclass
class ManagedProcess:
    """A long-running child with its output in ``log_path``."""

    argv: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.returncode is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
        return await self.proc.wait()


async def start_process(
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ManagedProcess:
    """Start ``argv`` with stdout+stderr appended to ``log_path`` and stdin closed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            preexec_fn=_set_pdeathsig,
        )
    return ManagedProcess(list(argv), log_path, proc)


async def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    input: bytes | None = None,
) -> RunResult:
    """Run a command to completion: ``(returncode, stdout, stderr)``; killed after ``timeout``."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        preexec_fn=_set_pdeathsig,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        out, err = await proc.communicate()
        err += f"\n[killed after {timeout}s]".encode()
    rc = proc.returncode if proc.returncode is not None else -1
    return rc, out.decode(errors="replace"), err.decode(errors="replace")


# -- skopeo ----------------------------------------------------------------------------------


async def skopeo(
    *args: str, timeout: float = 120.0, env: Mapping[str, str] | None = None
) -> RunResult:
    """``skopeo --insecure-policy ARGS...`` -> ``(rc, stdout, stderr)``.

    Callers pass ``--src-tls-verify=false`` / ``--dest-tls-verify=false`` and any creds.
    """
    return await run([SKOPEO_BIN, "--insecure-policy", *args], env=tool_env(env), timeout=timeout)


# -- htpasswd --------------------------------------------------------------------------------


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for an htpasswd file, as distribution requires.

    Tries the ``bcrypt`` package, then the stdlib ``crypt`` module (libxcrypt's ``$2b$``,
    Python <= 3.12), then ``htpasswd -nbB`` from apache2-utils.
    """
    try:
        import bcrypt  # type: ignore[import-not-found,unused-ignore]

        return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode())
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt  # removed in Python 3.13

            hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 5))
            if hashed and hashed.startswith("$2"):
                return hashed
        except (ImportError, AttributeError, OSError):
            pass
    return _htpasswd_cli_hash(password)


def _htpasswd_cli_hash(password: str) -> str:
    if shutil.which("htpasswd") is None:
        raise ProcessError("no bcrypt: pip install bcrypt, or apt-get install apache2-utils")
    out = subprocess.run(
        ["htpasswd", "-nbB", "-C", "5", "user", password],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip().split(":", 1)[1]


def write_htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    path.write_text("".join(f"{user}:{bcrypt_hash(pw)}\n" for user, pw in users.items()))
    return path


# -- docker-registry (CNCF distribution 2.8) -------------------------------------------------


@dataclass
class RegistryProcess:
    """A running ``docker-registry``; ``host`` is ``127.0.0.1:PORT`` for image references."""

    url: str
    port: int
    pid: int
    root: Path
    config_path: Path
    log_path: Path
    process: ManagedProcess = field(repr=False)
    users: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


def registry_config(
    storage: Path,
    port: int,
    *,
    proxy_remote_url: str | None = None,
    proxy_username: str | None = None,
    proxy_password: str | None = None,
    htpasswd_path: Path | None = None,
    storage_settings: Mapping[str, object] | None = None,
) -> str:
    """config.yml text (JSON is valid YAML) for distribution 2.8.

    ``storage_settings`` are entries of the ``storage`` section that replace the filesystem
    driver at ``storage``, e.g. ``{"s3": {...}, "redirect": {"disable": True}}``; ``delete``,
    ``cache`` and ``maintenance`` keep their values unless given there too.
    """
    storage_section: dict[str, object] = {
        "delete": {"enabled": True},
        "cache": {"blobdescriptor": "inmemory"},
        "maintenance": {"uploadpurging": {"enabled": False}},
    }
    if storage_settings is None:
        storage_section["filesystem"] = {"rootdirectory": str(storage)}
    else:
        storage_section.update(storage_settings)
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": storage_section,
        "http": {
            "addr": f"127.0.0.1:{port}",
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }
    if proxy_remote_url is not None:
        proxy: dict[str, str] = {"remoteurl": proxy_remote_url}
        if proxy_username is not None:
            proxy["username"] = proxy_username
            proxy["password"] = proxy_password or ""
        config["proxy"] = proxy
    if htpasswd_path is not None:
        config["auth"] = {"htpasswd": {"realm": "regproxy-test", "path": str(htpasswd_path)}}
    return json.dumps(config, indent=2) + "\n"


@contextlib.asynccontextmanager
async def docker_registry(
    tmpdir: Path | str,
    *,
    proxy_remote_url: str | None = None,
    htpasswd: Mapping[str, str] | None = None,
    proxy_username: str | None = None,
    proxy_password: str | None = None,
    startup_timeout: float = 20.0,
    binary: str = DOCKER_REGISTRY_BIN,
    storage_settings: Mapping[str, object] | None = None,
) -> AsyncIterator[RegistryProcess]:
    """Run Debian's ``docker-registry serve`` on 127.0.0.1:<free port>.

    Storage is ``tmpdir/storage`` (deletes enabled), or what ``storage_settings`` configures
    instead (see :func:`registry_config`, e.g. an S3 bucket). ``proxy_remote_url`` makes it a
    pull-through cache of that URL; in that mode distribution refuses pushes.
    ``proxy_username``/``proxy_password`` are only sent to an upstream that answers with a
    *Bearer* (token) challenge: distribution 2.8 ignores them for a Basic-auth upstream, so a
    pull-through cache cannot front an htpasswd-protected docker-registry.
    ``htpasswd`` ({user: password}) turns on basic auth. Yields once ``/v2/`` answers.
    """
    base = Path(tmpdir)
    base.mkdir(parents=True, exist_ok=True)
    htpasswd_path = write_htpasswd(base / "htpasswd", htpasswd) if htpasswd else None
    config_path = base / "config.yml"
    # Its S3 driver takes everything from config.yml; aws-sdk-go would also read AWS_* (and
    # refuses to start with AWS_CA_BUNDLE set, as its HTTP transport is a custom one).
    env = {k: v for k, v in tool_env().items() if not k.upper().startswith("AWS_")}
    for attempt in range(3):  # another process may grab the free port before we bind it
        port = free_port()
        config_path.write_text(
            registry_config(
                base / "storage",
                port,
                proxy_remote_url=proxy_remote_url,
                proxy_username=proxy_username,
                proxy_password=proxy_password,
                htpasswd_path=htpasswd_path,
                storage_settings=storage_settings,
            )
        )
        log_path = base / f"registry-{attempt}.log"
        process = await start_process(
            [binary, "serve", str(config_path)], log_path, env=env, cwd=base
        )
        try:
            await wait_http(f"http://127.0.0.1:{port}/v2/", startup_timeout, alive=process.alive)
            break
        except (ProcessError, TimeoutError) as exc:
            await process.stop()
            if attempt == 2 or "address already in use" not in process.log_tail():
                raise ProcessError(f"docker-registry failed: {exc}\n{process.log_tail()}") from exc
    try:
        yield RegistryProcess(
            url=f"http://127.0.0.1:{port}",
            port=port,
            pid=process.pid,
            root=base / "storage",
            config_path=config_path,
            log_path=log_path,
            process=process,
            users=dict(htpasswd or {}),
        )
    finally:
        await process.stop()


# -- dockerd ---------------------------------------------------------------------------------


@dataclass
class DockerDaemon:
    """A test-owned dockerd. :meth:`run` drives it with the docker CLI."""

    host: str
    socket_path: Path
    pid: int
    containerd_pid: int | None
    data_root: Path
    exec_root: Path
    config_dir: Path
    log_path: Path
    cli: str
    process: ManagedProcess = field(repr=False)

    def cli_env(self) -> dict[str, str]:
        return tool_env({"DOCKER_HOST": self.host, "DOCKER_CONFIG": str(self.config_dir)})

    async def run(
        self, *args: str, timeout: float = 120.0, input: bytes | None = None
    ) -> RunResult:
        """``docker ARGS...`` against this daemon -> ``(rc, stdout, stderr)``."""
        return await run([self.cli, *args], env=self.cli_env(), timeout=timeout, input=input)

    async def check(self, *args: str, timeout: float = 120.0, input: bytes | None = None) -> str:
        """Like :meth:`run` but raise :class:`ProcessError` on a non-zero exit; return stdout."""
        rc, out, err = await self.run(*args, timeout=timeout, input=input)
        if rc != 0:
            raise ProcessError(f"docker {' '.join(args)} exited {rc}: {err.strip() or out}")
        return out


def docker_cli() -> str:
    """The docker CLI to use: $REGPROXY_TEST_DOCKER_CLI, Debian's /usr/bin/docker, or PATH's."""
    override = os.environ.get("REGPROXY_TEST_DOCKER_CLI")
    if override:
        return override
    if os.access("/usr/bin/docker", os.X_OK):
        return "/usr/bin/docker"  # same release as Debian's dockerd
    found = shutil.which("docker")
    if found is None:
        raise ProcessError("docker CLI not found: apt-get install docker.io")
    return found


def daemon_json(base: Path) -> str:
    """Minimal daemon.json. dockerd 20.10 writes a legacy trust key, by default to
    /etc/docker/key.json; ``deprecated-key-path`` (config file only, no flag) keeps it ours."""
    return json.dumps({"deprecated-key-path": str(base / "key.json")}) + "\n"


def dockerd_argv(
    *,
    config_file: Path,
    data_root: Path,
    exec_root: Path,
    pidfile: Path,
    socket_path: Path,
    insecure_registries: Sequence[str],
    registry_mirrors: Sequence[str],
    binary: str = DOCKERD_BIN,
) -> list[str]:
    argv = [
        binary,
        f"--config-file={config_file}",
        f"--data-root={data_root}",
        f"--exec-root={exec_root}",
        f"--pidfile={pidfile}",
        f"--host=unix://{socket_path}",
        "--storage-driver=vfs",
        "--iptables=false",
        "--ip6tables=false",
        "--ip-forward=false",
        "--ip-masq=false",
        "--bridge=none",
        "--userland-proxy=false",
        "--log-level=info",
    ]
    argv += [f"--insecure-registry={r}" for r in insecure_registries]
    argv += [f"--registry-mirror={m}" for m in registry_mirrors]
    return argv


def _short_dir() -> Path:
    """A fresh directory under /tmp short enough for unix socket paths."""
    return Path(tempfile.mkdtemp(prefix="rpd-", dir="/tmp"))


@contextlib.asynccontextmanager
async def dockerd(
    tmpdir: Path | str,
    insecure_registries: Sequence[str] = (),
    registry_mirrors: Sequence[str] = (),
    *,
    startup_timeout: float = 60.0,
    stop_timeout: float = 20.0,
    keep_data: bool = False,
    binary: str = DOCKERD_BIN,
) -> AsyncIterator[DockerDaemon]:
    """Run Debian's dockerd as a private, test-owned daemon.

    Its data root and logs live in ``tmpdir``; its socket and exec root in a short
    ``/tmp/rpd-XXXX`` dir (unix socket paths must stay under ~100 chars). The host's
    /etc/docker/daemon.json is never read (``--config-file`` is our own, see
    :func:`daemon_json`), nor
    ~/.docker (``DOCKER_CONFIG`` is ``tmpdir/docker-config``). dockerd starts its own
    containerd (unless a system one listens on /run/containerd/containerd.sock); on exit both
    are stopped by PID and the directories removed (the data root only unless ``keep_data``).
    Registry mirrors must be URLs, e.g. ``http://127.0.0.1:5000``.
    """
    base = Path(tmpdir)
    base.mkdir(parents=True, exist_ok=True)
    short = _short_dir()
    config_file = base / "daemon.json"
    config_file.write_text(daemon_json(base))
    config_dir = base / "docker-config"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "config.json").write_text("{}\n")
    socket_path = short / "d.sock"
    if len(str(short / "x" / "containerd" / "containerd.sock.ttrpc")) > MAX_SOCKET_PATH:
        raise ProcessError(f"socket dir {short} is too long")
    data_root = base / "docker-data"
    exec_root = short / "x"
    argv = dockerd_argv(
        config_file=config_file,
        data_root=data_root,
        exec_root=exec_root,
        pidfile=short / "docker.pid",
        socket_path=socket_path,
        insecure_registries=insecure_registries,
        registry_mirrors=registry_mirrors,
        binary=binary,
    )
    process = await start_process(argv, base / "dockerd.log", env=tool_env())
    containerd_pid: int | None = None
    try:
        await _wait_docker_ping(socket_path, process, startup_timeout)
        containerd_pid = _containerd_pid(exec_root, process.pid)
        yield DockerDaemon(
            host=f"unix://{socket_path}",
            socket_path=socket_path,
            pid=process.pid,
            containerd_pid=containerd_pid,
            data_root=data_root,
            exec_root=exec_root,
            config_dir=config_dir,
            log_path=process.log_path,
            cli=docker_cli(),
            process=process,
        )
    finally:
        if containerd_pid is None:
            containerd_pid = _containerd_pid(exec_root, process.pid)
        await process.stop(stop_timeout)
        if containerd_pid is not None:
            await _stop_orphan(containerd_pid, str(exec_root), stop_timeout)
        _unmount_under([data_root, short])
        shutil.rmtree(short, ignore_errors=True)
        if not keep_data:
            shutil.rmtree(data_root, ignore_errors=True)


async def _wait_docker_ping(socket_path: Path, process: ManagedProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not socket_path.exists():
        if not process.alive():
            raise ProcessError(f"dockerd exited at start:\n{process.log_tail()}")
        if time.monotonic() > deadline:
            raise ProcessError(f"dockerd socket did not appear:\n{process.log_tail()}")
        await asyncio.sleep(0.1)
    try:
        await wait_http(
            "http://docker/_ping",
            max(1.0, deadline - time.monotonic()),
            alive=process.alive,
            connector=lambda: aiohttp.UnixConnector(path=str(socket_path)),
        )
    except (ProcessError, TimeoutError) as exc:
        raise ProcessError(f"dockerd did not come up: {exc}\n{process.log_tail()}") from exc


def _read_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _containerd_pid(exec_root: Path, dockerd_pid: int) -> int | None:
    """PID of the containerd that our dockerd started, checked against its command line."""
    try:
        pid = int((exec_root / "containerd" / "containerd.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    owned = str(exec_root) in _read_cmdline(pid) and pid != dockerd_pid
    return pid if owned else None


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def _stop_orphan(pid: int, marker: str, timeout: float) -> None:
    """Stop a grandchild (not our child, so no waitpid) if it still runs with ``marker``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _pid_alive(pid) or marker not in _read_cmdline(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].replace("\\040", " ") for line in f]


def _unmount_under(dirs: Sequence[Path]) -> None:
    """Lazily unmount what a killed dockerd left mounted under ``dirs`` (deepest first)."""
    prefixes = [str(d.resolve()) for d in dirs]
    leftovers = [
        m for m in _mount_points() if any(m == p or m.startswith(p + "/") for p in prefixes)
    ]
    for mount_point in sorted(set(leftovers), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount_point], check=False, capture_output=True)


# -- containerd ------------------------------------------------------------------------------

CONTAINERD_BIN = "/usr/bin/containerd"
CTR_BIN = "/usr/bin/ctr"
# Plugins a test's containerd does not need: CRI (CNI, streaming server, /opt/cni), the opt
# plugin (/opt/containerd), tasks and runtimes (shims, cgroups), tracing, and every
# snapshotter but native (plain directories: no mounts, works on any filesystem).
CONTAINERD_DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.restart",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.runtime.v1.linux",
    "io.containerd.runtime.v2.task",
    "io.containerd.monitor.v1.cgroups",
    "io.containerd.service.v1.tasks-service",
    "io.containerd.grpc.v1.tasks",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.snapshotter.v1.zfs",
)


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def containerd_config(root: Path, state: Path, socket_path: Path) -> str:
    """config.toml (version 2) keeping all of containerd's files under ``root`` and ``state``.

    Content is ``isolated`` per namespace, so a second namespace pulls every blob again
    instead of reusing what the first one fetched.
    """
    disabled = ", ".join(_toml_str(p) for p in CONTAINERD_DISABLED_PLUGINS)
    return (
        "version = 2\n"
        f"root = {_toml_str(str(root))}\n"
        f"state = {_toml_str(str(state))}\n"
        f"disabled_plugins = [{disabled}]\n"
        "[grpc]\n"
        f"  address = {_toml_str(str(socket_path))}\n"
        "[ttrpc]\n"
        f"  address = {_toml_str(f'{socket_path}.ttrpc')}\n"
        '[debug]\n  address = ""\n'
        '[metrics]\n  address = ""\n'
        '[plugins."io.containerd.metadata.v1.bolt"]\n'
        '  content_sharing_policy = "isolated"\n'
    )


@dataclass
class ContainerdDaemon:
    """A test-owned containerd. :meth:`ctr` drives it with ``ctr`` in namespace ``namespace``.

    ``ctr`` does the registry work itself (containerd 1.6 has no transfer service): it reads
    ``--hosts-dir`` and talks HTTP; the daemon holds content, images and snapshots.
    """

    socket_path: Path
    pid: int
    root: Path
    state: Path
    config_path: Path
    log_path: Path
    process: ManagedProcess = field(repr=False)
    namespace: str = "regproxy-test"

    def ctr_env(self) -> dict[str, str]:
        env = {k: v for k, v in tool_env().items() if not k.startswith("CONTAINERD_")}
        env["CONTAINERD_SNAPSHOTTER"] = "native"  # ctr's default, overlayfs, is disabled
        return env

    async def ctr(
        self, *args: str, namespace: str | None = None, timeout: float = 120.0
    ) -> RunResult:
        """``ctr --address SOCK --namespace NS ARGS...`` -> ``(returncode, stdout, stderr)``."""
        argv = [
            CTR_BIN,
            "--address",
            str(self.socket_path),
            "--namespace",
            namespace or self.namespace,
            *args,
        ]
        return await run(argv, env=self.ctr_env(), timeout=timeout)

    async def ctr_check(
        self, *args: str, namespace: str | None = None, timeout: float = 120.0
    ) -> str:
        """Like :meth:`ctr` but raise :class:`ProcessError` on a non-zero exit; return stdout."""
        rc, out, err = await self.ctr(*args, namespace=namespace, timeout=timeout)
        if rc != 0:
            raise ProcessError(f"ctr {' '.join(args)} exited {rc}: {err.strip() or out}")
        return out


@contextlib.asynccontextmanager
async def containerd(
    tmpdir: Path | str,
    *,
    startup_timeout: float = 30.0,
    stop_timeout: float = 20.0,
    binary: str = CONTAINERD_BIN,
) -> AsyncIterator[ContainerdDaemon]:
    """Run Debian's containerd as a private, test-owned daemon (content and images only).

    Its root (content store, metadata, snapshots) and log live in ``tmpdir``; its socket and
    state in a short ``/tmp/rpd-XXXX`` dir (unix socket paths must stay under ~100 chars).
    The host's /etc/containerd is never read (``--config`` is our own, see
    :func:`containerd_config`). Yields once ``ctr version`` answers; on exit it is stopped by
    PID, whatever it left mounted is unmounted and both directories are removed.
    """
    base = Path(tmpdir)
    base.mkdir(parents=True, exist_ok=True)
    short = _short_dir()
    socket_path = short / "c.sock"
    root = base / "containerd-root"
    state = short / "state"
    config_path = base / "containerd.toml"
    config_path.write_text(containerd_config(root, state, socket_path))
    argv = [binary, "--config", str(config_path), "--log-level", "info"]
    process = await start_process(argv, base / "containerd.log", env=tool_env())
    daemon = ContainerdDaemon(
        socket_path=socket_path,
        pid=process.pid,
        root=root,
        state=state,
        config_path=config_path,
        log_path=process.log_path,
        process=process,
    )
    try:
        await _wait_containerd(daemon, startup_timeout)
        yield daemon
    finally:
        await process.stop(stop_timeout)
        _unmount_under([root, short])
        shutil.rmtree(short, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


async def _wait_containerd(daemon: ContainerdDaemon, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if not daemon.process.alive():
            raise ProcessError(f"containerd exited at start:\n{daemon.process.log_tail()}")
        err = ""
        if daemon.socket_path.exists():
            rc, _, err = await daemon.ctr("version", timeout=10)
            if rc == 0:
                return
        if time.monotonic() > deadline:
            raise ProcessError(f"containerd did not come up: {err}\n{daemon.process.log_tail()}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


# -- podman ----------------------------------------------------------------------------------

PODMAN_BIN = "/usr/bin/podman"
INSECURE_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


@dataclass
class Podman:
    """Rootful podman with private storage and configuration (podman has no daemon).

    Every command runs as ``podman --root R --runroot RR --storage-driver vfs --tmpdir T ...``
    with ``CONTAINERS_CONF``, ``CONTAINERS_STORAGE_CONF``, ``CONTAINERS_REGISTRIES_CONF``,
    ``REGISTRY_AUTH_FILE``, ``HOME`` and ``TMPDIR`` pointing into ``base`` (runroot and
    tmpdir in a short ``/tmp/rpd-XXXX``: podman refuses a runroot longer than 50 characters),
    so podman's storage, state, configuration and credentials are the test's own. Like
    skopeo, it still reads /etc/containers/registries.d and registries.conf.d (Debian ships
    only short-name aliases there) and records blob locations in /var/lib/containers/cache.
    Write the registries configuration with :meth:`write_registries_conf`; pass
    :attr:`policy_path` as ``--signature-policy`` to pull and push.
    """

    base: Path
    root: Path
    runroot: Path
    tmpdir: Path
    registries_conf: Path
    policy_path: Path
    binary: str = PODMAN_BIN

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in tool_env().items()
            if not k.startswith(("CONTAINERS_", "CONTAINER_", "REGISTRY_", "XDG_"))
        }
        env.update(
            {
                "CONTAINERS_CONF": str(self.base / "containers.conf"),
                "CONTAINERS_STORAGE_CONF": str(self.base / "storage.conf"),
                "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
                "REGISTRY_AUTH_FILE": str(self.base / "auth.json"),
                "HOME": str(self.base / "home"),
                "XDG_CONFIG_HOME": str(self.base / "home" / ".config"),
                "TMPDIR": str(self.tmpdir),
            }
        )
        return env

    def argv(self, *args: str) -> list[str]:
        return [
            self.binary,
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "vfs",
            "--tmpdir",
            str(self.tmpdir),
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "none",
            "--network-config-dir",
            str(self.base / "networks"),
            "--volumepath",
            str(self.base / "volumes"),
            *args,
        ]

    def write_registries_conf(self, text: str) -> None:
        self.registries_conf.write_text(text)

    async def run(
        self, *args: str, timeout: float = 120.0, input: bytes | None = None
    ) -> RunResult:
        """``podman ARGS...`` -> ``(returncode, stdout, stderr)``."""
        return await run(self.argv(*args), env=self.env(), timeout=timeout, input=input)

    async def check(self, *args: str, timeout: float = 120.0, input: bytes | None = None) -> str:
        """Like :meth:`run` but raise :class:`ProcessError` on a non-zero exit; return stdout."""
        rc, out, err = await self.run(*args, timeout=timeout, input=input)
        if rc != 0:
            raise ProcessError(f"podman {' '.join(args)} exited {rc}: {err.strip() or out}")
        return out


@contextlib.asynccontextmanager
async def podman(tmpdir: Path | str, *, binary: str = PODMAN_BIN) -> AsyncIterator[Podman]:
    """A :class:`Podman` whose storage and configuration live in ``tmpdir`` and its run
    state in a short ``/tmp/rpd-XXXX`` dir.

    ``registries.conf`` starts with no search registries (write your own with
    :meth:`Podman.write_registries_conf`). The network backend is CNI, which podman only
    configures in memory for pulls and pushes (netavark's would create
    /run/containers/networks). On exit whatever podman left mounted is unmounted and its
    storage and run state are removed.
    """
    base = Path(tmpdir)
    base.mkdir(parents=True, exist_ok=True)
    short = _short_dir()  # podman refuses a runroot path longer than 50 characters
    tool = Podman(
        base=base,
        root=base / "storage",
        runroot=short / "run",
        tmpdir=short / "tmp",
        registries_conf=base / "registries.conf",
        policy_path=base / "policy.json",
        binary=binary,
    )
    for path in (tool.root, tool.runroot, tool.tmpdir, base / "networks", base / "volumes"):
        path.mkdir(exist_ok=True)
    (base / "home").mkdir(exist_ok=True)
    (base / "storage.conf").write_text(
        "[storage]\n"
        'driver = "vfs"\n'
        f"graphroot = {json.dumps(str(tool.root))}\n"
        f"runroot = {json.dumps(str(tool.runroot))}\n"
    )
    (base / "containers.conf").write_text(
        '[engine]\nevents_logger = "none"\ncgroup_manager = "cgroupfs"\n'
        f"image_copy_tmp_dir = {json.dumps(str(tool.tmpdir))}\n"
        f"static_dir = {json.dumps(str(tool.root / 'libpod'))}\n"
        f"volume_path = {json.dumps(str(base / 'volumes'))}\n"
        '[network]\nnetwork_backend = "cni"\n'
        f"network_config_dir = {json.dumps(str(base / 'networks'))}\n"
    )
    tool.write_registries_conf("unqualified-search-registries = []\n")
    tool.policy_path.write_text(json.dumps(INSECURE_POLICY) + "\n")
    (base / "auth.json").write_text("{}\n")
    try:
        yield tool
    finally:
        _unmount_under([tool.root, short])
        shutil.rmtree(tool.root, ignore_errors=True)
        shutil.rmtree(short, ignore_errors=True)


# -- regproxy --------------------------------------------------------------------------------

# The checkout's src/, so the server runs the code under test even without an editable install.
REGPROXY_SRC = Path(__file__).resolve().parents[2] / "src"


@dataclass
class RegproxyProcess:
    """A running ``regproxy serve``; ``host`` is ``127.0.0.1:PORT`` for image references."""

    url: str
    port: int
    pid: int
    data_dir: Path
    log_path: Path
    process: ManagedProcess = field(repr=False)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.alive()

    def log_tail(self, lines: int = 30) -> str:
        return self.process.log_tail(lines)

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        return await self.process.stop(timeout)

    async def kill(self) -> int:
        """SIGKILL (no chance to clean up, like a crash) and reap. Returns the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.proc.kill()
        return await self.process.proc.wait()


def regproxy_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The loopback-guarded tool environment without any inherited ``REGPROXY_*`` variable
    (regproxy refuses unknown ones, e.g. REGPROXY_TEST_DOCKER_CLI), plus ``extra``."""
    env = {k: v for k, v in tool_env().items() if not k.startswith("REGPROXY_")}
    pythonpath = [str(REGPROXY_SRC), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def regproxy_argv(port: int, data_dir: Path, config_path: Path | None = None) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "regproxy",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(data_dir),
    ]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    return argv


@contextlib.asynccontextmanager
async def regproxy(
    tmpdir: Path | str,
    *,
    data_dir: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    config: str | None = None,
    startup_timeout: float = 30.0,
    stop_timeout: float = 15.0,
) -> AsyncIterator[RegproxyProcess]:
    """Run ``python -m regproxy serve`` on 127.0.0.1:<free port>.

    Data lives in ``data_dir`` (default ``tmpdir/data``; pass the same one again to restart
    on it), the log in ``tmpdir/regproxy-<n>.log``. ``env`` adds ``REGPROXY_*`` settings;
    ``config`` is TOML text written to ``tmpdir/config.toml`` and passed with ``--config``.
    Yields once ``/healthz`` answers 200; on exit the process is stopped by its PID (SIGTERM,
    then SIGKILL after ``stop_timeout``) unless the test already stopped it. Its log is JSON
    lines (tests read the access lines' fields) unless ``config`` sets ``log_format``.
    """
    base = Path(tmpdir)
    base.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir) if data_dir is not None else base / "data"
    config_path: Path | None = None
    if config is not None:
        config_path = base / "config.toml"
        config_path.write_text(config)
    server_env = regproxy_env(env)
    if "log_format" not in (config or ""):
        server_env.setdefault("REGPROXY_LOG_FORMAT", "json")
    for attempt in range(3):  # another process may grab the free port before we bind it
        port = free_port()
        log_path = _next_log_path(base, "regproxy")
        process = await start_process(
            regproxy_argv(port, data, config_path), log_path, env=server_env, cwd=base
        )
        try:
            status = await wait_http(
                f"http://127.0.0.1:{port}/healthz", startup_timeout, alive=process.alive
            )
            if status != 200:
                raise ProcessError(f"/healthz answered {status}")
            break
        except (ProcessError, TimeoutError) as exc:
            await process.stop(stop_timeout)
            if attempt == 2 or "address already in use" not in process.log_tail().lower():
                raise ProcessError(f"regproxy failed: {exc}\n{process.log_tail()}") from exc
    server = RegproxyProcess(
        url=f"http://127.0.0.1:{port}",
        port=port,
        pid=process.pid,
        data_dir=data,
        log_path=log_path,
        process=process,
    )
    try:
        yield server
    finally:
        await process.stop(stop_timeout)


def _next_log_path(base: Path, stem: str) -> Path:
    n = 0
    while (base / f"{stem}-{n}.log").exists():
        n += 1
    return base / f"{stem}-{n}.log"


def proc_status_kib(pid: int, key: str) -> int:
    """A ``kB`` figure from ``/proc/PID/status``, e.g. ``VmHWM`` (peak RSS) or ``VmRSS``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    raise KeyError(f"{key} not in /proc/{pid}/status")


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-cased names; the last of repeated headers wins
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


async def raw_http(
    port: int,
    method: str,
    target: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
) -> RawResponse:
    """One HTTP/1.1 request on its own connection with ``target`` sent exactly as given
    (no normalisation or escaping, unlike HTTP client libraries); reads to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = {"Host": f"127.0.0.1:{port}", "Connection": "close"}
        if body or method in ("POST", "PUT", "PATCH"):
            head["Content-Length"] = str(len(body))
        head.update(headers or {})
        lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    raw_head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    if parsed.get("transfer-encoding", "").lower() == "chunked":
        payload = _dechunk(payload)
    return RawResponse(int(status_line.split()[1]), parsed, payload)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)
