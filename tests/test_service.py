"""vnicd as systemd runs it: the unit, sd_notify on a real NOTIFY_SOCKET, reload, clean stop."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.conftest import Nic, vm_xml
from tests.harness import SchemaClient
from tests.hostenv import master
from tests.test_daemon import VNICD, state, wait_ready
from vnicd.client import Client, RpcError
from vnicd.errors import HotunplugNicError, Recovering

__all__ = ["state"]  # the fixture, used by name
UNIT = Path(__file__).resolve().parent.parent / "systemd" / "vnicd.service"


class NotifySocket:
    """The socket systemd would listen on: every datagram, with the time it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [
            (t, line)
            for t, m in list(self.messages)
            for line in m.splitlines()
            if line.startswith(prefix)
        ]

    def wait(self, prefix: str, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.lines(prefix)
            if found:
                return found[0][0]
            time.sleep(0.01)
        raise AssertionError(f"no {prefix} within {timeout} s: {self.messages}")


@pytest.fixture
def notify(state: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(state / "notify.sock")
    try:
        yield sock
    finally:
        sock.close()


def launch(config: Path, log: IO[str], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(VNICD), "--config", str(config)],
        stderr=log,
        text=True,
        env={**os.environ, **env},
    )


def write_config(state: Path, extra: str = "") -> Path:
    config = state / "vnicd.yml"
    config.write_text(
        f"state_dir: {state}\nrpc: {{unix_socket: {state / 'vnicd.sock'}}}\n"
        f"unwired_bridge: vt-unwired3\n{extra}"
    )
    return config


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(path: Path, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not in {path.read_text()}"
        time.sleep(0.02)


def test_unit_passes_systemd_analyze_verify() -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (package systemd) is needed to check the unit"
    exec_start = Path("/usr/local/bin/vnicd")
    assert os.access(exec_start, os.X_OK), "contrib/setup-host links /usr/local/bin/vnicd"
    proc = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    settings = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line[:30]
    )
    assert settings["Type"] == "notify"
    assert settings["KillMode"] == "process"
    assert settings["ExecStart"].split()[0] == str(exec_start)
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["RuntimeDirectory"] == settings["StateDirectory"] == "vnicd"
    assert settings["Restart"] == "on-failure" and int(settings["WatchdogSec"]) > 0
    assert settings["ProtectHome"] != "yes", "the checkout may live under /root"


def test_ready_status_and_watchdog(state: Path, notify: NotifySocket) -> None:
    """READY once the socket serves; pings at a quarter of WATCHDOG_USEC, none while it is
    stopped (they come from its running loop), and STOPPING on SIGTERM."""
    sock = state / "vnicd.sock"
    log = (state / "vnicd.log").open("w")
    proc = launch(write_config(state), log, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="600000")
    try:
        ready_at = notify.wait("READY=1")
        with SchemaClient(sock) as c:  # READY means serving, not "recovering"
            assert c.call("Host.ping2") is True
        statuses = [line for t, line in notify.lines("STATUS=") if t <= ready_at]
        assert any("recovering" in s for s in statuses), statuses
        assert notify.lines("READY=1")[0][1] == "READY=1"
        assert f"STATUS=serving on {sock}" in {line for _, line in notify.lines("STATUS=")}

        time.sleep(2)
        pings = [t for t, _ in notify.lines("WATCHDOG=1")]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert len(pings) >= 6, pings  # every 0.15 s: ~13 in 2 s
        assert max(gaps) < 0.6, gaps  # never a whole watchdog period without one

        proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        time.sleep(1.2)  # eight ping intervals
        resumed = time.monotonic()
        proc.send_signal(signal.SIGCONT)
        time.sleep(1)
        pings = [t for t, _ in notify.lines("WATCHDOG=1")]
        assert not [t for t in pings if stopped + 0.05 < t < resumed], "pings while stopped"
        assert [t for t in pings if t > resumed], "pings resume when the process runs again"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert notify.lines("STOPPING=1")
        assert not sock.exists()
    finally:
        stop(proc)
        log.close()


def test_no_notify_socket_no_notifications(state: Path) -> None:
    """Without NOTIFY_SOCKET vnicd runs in the foreground and says nothing to systemd."""
    log = (state / "vnicd.log").open("w")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    proc = subprocess.Popen(
        [str(VNICD), "--config", str(write_config(state))], stderr=log, text=True, env=env
    )
    try:
        wait_ready(proc, state / "vnicd.sock")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        text = (state / "vnicd.log").read_text()
        assert "systemd notification failed" not in text and "watchdog" not in text
    finally:
        stop(proc)
        log.close()


def test_sighup_applies_live_keys_and_refuses_the_rest(state: Path) -> None:
    sock = state / "vnicd.sock"
    log_path = state / "vnicd.log"
    log = log_path.open("w")
    config = write_config(state)
    proc = launch(config, log)
    try:
        wait_ready(proc, sock)
        with Client(sock) as kept:  # a connection open across both reloads
            write_config(state, "log_level: DEBUG\nhooks: {timeout: 5}\n")
            proc.send_signal(signal.SIGHUP)
            wait_for(log_path, f"configuration reloaded from {config}")
            text = log_path.read_text()
            assert "reload: log_level 'INFO' -> 'DEBUG'" in text
            assert "reload: hooks.timeout 30.0 -> 5.0" in text

            config.write_text(
                config.read_text().replace(str(sock), str(state / "other.sock")) + "workers: 3\n"
            )
            proc.send_signal(signal.SIGHUP)
            wait_for(log_path, "reload refused: workers cannot change")
            assert "reload refused: rpc.unix_socket cannot change while vnicd runs" in (
                log_path.read_text()
            )

            config.write_text("workers: [\n")
            proc.send_signal(signal.SIGHUP)
            wait_for(log_path, "reload refused, keeping the running configuration")

            assert kept.call("Host.ping2") is True
        assert not (state / "other.sock").exists()
        with Client(sock) as c:
            assert c.call("Host.ping2") is True
        assert proc.poll() is None
    finally:
        stop(proc)
        log.close()
    assert proc.returncode == 0


def test_sigterm_answers_calls_in_flight(state: Path) -> None:
    """A SIGTERM during an unplug that waits for its guest: the call is answered, then vnicd
    exits cleanly, its socket gone, the VM still running on its bridge."""
    sock = state / "vnicd.sock"
    log = (state / "vnicd.log").open("w")
    proc = launch(write_config(state, "unplug_timeout: 2\n"), log)
    vm_id = f"5e1f0000-0000-4000-8001-{os.getpid():012x}"
    nic = Nic("vt-a", mac="52:54:00:7f:01:01", tap=f"vs{os.getpid() % 100000}")
    answers: list[object] = []
    try:
        wait_ready(proc, sock)
        with SchemaClient(sock) as c:
            c.call("VM.create", vmID=vm_id, vmParams={"xml": vm_xml("stop-vm", vm_id, [nic])})

        def unplug() -> None:
            with Client(sock) as c:
                try:
                    answers.append(
                        c.call(
                            "VM.hotunplugNic",
                            vmID=vm_id,
                            params={"alias": "net0"},
                        )
                    )
                except (RpcError, ConnectionError) as e:
                    answers.append(e)

        caller = threading.Thread(target=unplug)
        caller.start()
        time.sleep(0.5)  # the unplug now waits for a guest that never answers
        proc.send_signal(signal.SIGTERM)
        caller.join(30)
        assert proc.wait(30) == 0
        (answer,) = answers
        assert isinstance(answer, RpcError) and answer.code == HotunplugNicError.code, answer
        assert not sock.exists()
        assert master(nic.tap) == "vt-a", "the VM outlives vnicd"
    finally:
        stop(proc)
        log.close()


def test_sigterm_while_waiting_for_libvirtd(state: Path, notify: NotifySocket) -> None:
    """No libvirtd behind the URI: vnicd answers "recovering" and still stops at once."""
    config = write_config(state, f"libvirt: {{uri: 'qemu:///system?socket={state}/none'}}\n")
    log = (state / "vnicd.log").open("w")
    proc = launch(config, log, NOTIFY_SOCKET=str(notify.path))
    sock = state / "vnicd.sock"
    try:
        notify.wait("STATUS=waiting for libvirt")
        with pytest.raises(RpcError) as e, Client(sock) as c:
            c.call("Host.ping2")
        assert e.value.code == Recovering.code
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not sock.exists() and not notify.lines("READY=1")
        assert "stopping before vnicd was ready" in (state / "vnicd.log").read_text()
    finally:
        stop(proc)
        log.close()
