"""Starting a distributed run: `gallery serve CONFIG --hosts h1,h2` runs MLX's own launcher, `mlx.launch`.

mlx.launch starts `python -m runtime …` once per host entry (over ssh for remote hosts, directly for this
machine), gives each process its rank and the backend's host file, relays their stdout/stderr, and stops
the remaining ranks when one fails. This module only builds its command line and stays as the parent:

- rank 0 must run on this machine (it serves the interface you connect to), so the first host must be a
  local address;
- SIGINT/SIGTERM go to rank 0, which drains like a single-process runtime and then tells the other ranks
  to exit; a second signal kills the whole launch;
- stdio: mlx.launch copies its stdin to every rank and never passes on end-of-input, so the JSON-RPC
  stream goes through a pair of named pipes between this process and rank 0 instead;
- mlx.launch exits 0 whatever its ranks did, so rank 0 leaves its exit code in a file for this process
  to return;
- once rank 0 has left that file, the other ranks get FOLLOWERS_GRACE_S to exit, then every process of the
  launch is killed: mlx.launch waits forever for a rank that cannot take its SIGTERM (a stopped one), and a
  rank 0 that found a rank hung (runtime.cluster_watch) exits without waiting for it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

from gallery.errors import UsageError

log = logging.getLogger("runtime")

# Environment the launcher sets for every rank (mlx.launch --env).
ENV_BACKEND = "GALLERY_DISTRIBUTED_BACKEND"
ENV_LAUNCH_DIR = "GALLERY_LAUNCH_DIR"  # rank 0 writes rank0.pid and rank0.exit here
ENV_STDIO_IN = "GALLERY_STDIO_IN"
ENV_STDIO_OUT = "GALLERY_STDIO_OUT"
DEFAULT_RING_PORT = 32323  # mlx.launch's own default
FOLLOWERS_GRACE_S = 5.0  # after rank 0 has finished: the others only free their memory and exit
LOST_GRACE_S = 1.0  # after rank 0 found a rank hung: only for mlx.launch to pass on rank 0's last log lines


def launcher_path() -> str:
    """The mlx.launch script next to this Python (the one that has mlx), else on PATH. Raises UsageError."""
    beside = Path(sys.executable).parent / "mlx.launch"
    if beside.is_file():
        return str(beside)
    found = shutil.which("mlx.launch")
    if found is None:
        raise UsageError("mlx.launch was not found (it comes with the mlx package: pip install mlx)")
    return found


def is_local_address(host: str) -> bool:
    """Whether host is an address of this machine (a socket can bind to it)."""
    with contextlib.suppress(OSError), socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return True
    return False


def _family(host: str) -> socket.AddressFamily:
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            return socket.AF_INET6
    return socket.AF_INET


def check_hosts(hosts: list[str], backend: str) -> None:
    """Refuse host lists mlx.launch would refuse later, or that would put rank 0 elsewhere (UsageError)."""
    if len(hosts) < 2:
        raise UsageError(
            f"--hosts: a distributed run needs at least 2 ranks, got {len(hosts)} "
            "(name a host twice for two ranks on it, e.g. 127.0.0.1,127.0.0.1)"
        )
    if backend == "ring":
        for host in hosts:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise UsageError(
                    f"--hosts: the ring backend needs IP addresses, got {host!r} "
                    "(use a --hostfile to give ssh names with their IPs)"
                ) from None
    if not is_local_address(hosts[0]):
        raise UsageError(
            f"--hosts: the first host ({hosts[0]}) runs rank 0, which serves the interface: run this command on "
            "that machine (or list this machine first)"
        )


def hostfile_backend(path: str) -> str | None:
    """The backend an mlx.launch hostfile names (`"backend": "jaccl"`), if it names one."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        backend = data.get("backend") if isinstance(data, dict) else None
        return backend if backend in ("ring", "jaccl") else None
    return None


def free_port_block(count: int, start: int = DEFAULT_RING_PORT) -> int:
    """The first port p >= start with p … p+count-1 all free on this machine (the ring listens there)."""
    for base in range(start, start + 4000, count):
        ok = True
        for port in range(base, base + count):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("0.0.0.0", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise UsageError(f"no {count} consecutive free ports from {start}: pass --ring-port")


def launch_command(
    rank_args: list[str],
    *,
    hosts: list[str],
    hostfile: str | None,
    backend: str,
    port: int,
    env: dict[str, str],
) -> list[str]:
    """The mlx.launch command line that runs `python -m runtime RANK_ARGS` on every rank."""
    command = [launcher_path(), "--backend", backend]
    command += ["--hostfile", hostfile] if hostfile else ["--hosts", ",".join(hosts)]
    if backend == "ring":
        command += ["--starting-port", str(port)]
    command += ["--python", sys.executable]
    for key, value in env.items():
        command += ["--env", f"{key}={value}"]
    return [*command, "--", "-m", "runtime", *rank_args]


class _StdioRelay:
    """Copies this process's stdin to rank 0 and rank 0's answers to stdout, through two named pipes."""

    def __init__(self, folder: Path) -> None:
        self.inbound = folder / "stdin"
        self.outbound = folder / "stdout"
        os.mkfifo(self.inbound, 0o600)
        os.mkfifo(self.outbound, 0o600)

    def start(self) -> None:
        """Start both copies (each waits for rank 0 to open its end)."""
        threading.Thread(target=self._copy_in, daemon=True, name="stdio-in").start()
        threading.Thread(target=self._copy_out, daemon=True, name="stdio-out").start()

    def _copy_in(self) -> None:
        with contextlib.suppress(OSError), open(self.inbound, "wb", buffering=0) as pipe:
            _copy(sys.stdin.buffer, pipe)

    def _copy_out(self) -> None:
        with contextlib.suppress(OSError), open(self.outbound, "rb", buffering=0) as pipe:
            _copy(pipe, sys.stdout.buffer)


def _copy(source: IO[bytes], target: IO[bytes]) -> None:
    read = getattr(source, "read1", source.read)
    while True:
        chunk = read(1 << 16)
        if not chunk:
            return
        target.write(chunk)
        target.flush()


def run_launch(
    rank_args: list[str],
    *,
    hosts: list[str],
    hostfile: str | None,
    backend: str,
    port: int | None,
    stdio: bool,
) -> int:
    """Start every rank with mlx.launch, relay signals (and stdio), and return rank 0's exit code."""
    if hostfile is None:
        check_hosts(hosts, backend)
    elif not Path(hostfile).is_file():
        raise UsageError(f"--hostfile {hostfile}: no such file")
    count = len(hosts) if hosts else 8
    # A random start: two launches starting at once (tests in parallel, two services) must not both pick
    # the same free block before either has bound it.
    base = port if port is not None else free_port_block(count, DEFAULT_RING_PORT + secrets.randbelow(4000))
    with tempfile.TemporaryDirectory(prefix="gallery-launch-") as folder:
        launch_dir = Path(folder)
        env = {ENV_BACKEND: backend, ENV_LAUNCH_DIR: str(launch_dir)}
        relay = None
        if stdio:
            relay = _StdioRelay(launch_dir)
            env.update({ENV_STDIO_IN: str(relay.inbound), ENV_STDIO_OUT: str(relay.outbound)})
        command = launch_command(
            rank_args, hosts=hosts, hostfile=hostfile, backend=backend, port=base, env=env
        )
        log.info(
            "starting %s rank(s) with mlx.launch (%s backend)",
            len(hosts) if hosts else "the hostfile's",
            backend,
        )
        # A pipe nobody writes: mlx.launch copies its stdin to every rank and would spin on end-of-input.
        quiet_in, keep_open = os.pipe()
        process = subprocess.Popen(command, stdin=quiet_in, start_new_session=True)
        os.close(quiet_in)
        if relay is not None:
            relay.start()
        stop = _Stopper(process, launch_dir)
        previous = {sig: signal.signal(sig, stop.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            _wait(process, launch_dir)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(keep_open)
        return _rank0_exit(launch_dir, stop.exit_code)


def _wait(process: subprocess.Popen[bytes], launch_dir: Path) -> None:
    """Wait for mlx.launch to end; kill what is left of the launch a grace period after rank 0 finished."""
    from runtime.cluster_watch import LOST_EXIT

    finished_at: float | None = None
    grace = FOLLOWERS_GRACE_S
    while True:
        try:
            process.wait(timeout=0.2)
            return
        except subprocess.TimeoutExpired:
            pass
        if finished_at is None:
            if (launch_dir / "rank0.exit").exists():
                finished_at = time.monotonic()
                grace = LOST_GRACE_S if _rank0_exit(launch_dir, 0) == LOST_EXIT else FOLLOWERS_GRACE_S
        elif time.monotonic() - finished_at > grace:
            log.warning("rank 0 has exited, the other ranks have not after %g s: killing them", grace)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return


class _Stopper:
    """First signal: ask rank 0 to stop (it stops the others). Second: kill every local rank and the launcher."""

    def __init__(self, process: subprocess.Popen[bytes], launch_dir: Path) -> None:
        self.process = process
        self.launch_dir = launch_dir
        self.signals = 0
        self.exit_code = 0

    def on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1
        if signum == signal.SIGINT:
            self.exit_code = 130
        rank0 = rank0_pid(self.launch_dir)
        if self.signals == 1 and rank0 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank0, signum)
            threading.Thread(target=self._kill_later, daemon=True).start()
            return
        self._kill()

    def _kill_later(self) -> None:
        deadline = (
            time.monotonic() + 60.0
        )  # rank 0's drain has its own grace; this only catches a stuck launch
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return
            time.sleep(0.2)
        self._kill()

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


def rank0_pid(launch_dir: Path) -> int | None:
    """Rank 0's pid once it has started (it writes rank0.pid), else None."""
    with contextlib.suppress(OSError, ValueError):
        return int((launch_dir / "rank0.pid").read_text().strip())
    return None


def _rank0_exit(launch_dir: Path, fallback: int) -> int:
    try:
        return int((launch_dir / "rank0.exit").read_text().strip())
    except (OSError, ValueError):
        return fallback or 1  # rank 0 never got to write it: it was killed, or never started


def rank_started() -> None:
    """In rank 0: record this process's pid where the launching parent looks for it."""
    folder = os.environ.get(ENV_LAUNCH_DIR)
    if folder:
        with contextlib.suppress(OSError):
            (Path(folder) / "rank0.pid").write_text(str(os.getpid()))


def rank_finished(code: int) -> None:
    """In rank 0: leave the exit code for the launching parent (mlx.launch does not pass it on)."""
    folder = os.environ.get(ENV_LAUNCH_DIR)
    if folder:
        with contextlib.suppress(OSError):
            (Path(folder) / "rank0.exit").write_text(str(code))


def attach_stdio() -> None:
    """In rank 0 of a launch with --stdio: use the named pipes to the parent as stdin and stdout."""
    inbound, outbound = os.environ.get(ENV_STDIO_IN), os.environ.get(ENV_STDIO_OUT)
    if not inbound or not outbound:
        return
    read_fd = os.open(inbound, os.O_RDONLY)
    write_fd = os.open(outbound, os.O_WRONLY)
    os.dup2(read_fd, 0)
    os.dup2(write_fd, 1)
    os.close(read_fd)
    os.close(write_fd)
