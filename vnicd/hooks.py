"""Administrator hooks around a vNIC change, in VDSM's layout and with its conventions.

``<hooks.dir>/<hook name>/<executables>`` run in name order. Each gets the device XML in a
file named by ``$_hook_domxml`` (a ``before_`` hook may rewrite it: the next script and the
caller see the new text) and the request's custom properties as environment variables; never
a shell, never request data on a command line. Exit codes as in VDSM: 0 success, 1 failed
(the remaining scripts still run), 2 failed and stop (none of the remaining run); any other
code or a signal counts as failed. A script still running after ``hooks.timeout`` seconds is
killed with its whole process group and counts as exit 2.

A failed ``before_`` hook vetoes the change (:class:`vnicd.errors.HookError`, code 1500); a
failed ``after_`` hook is logged and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from vnicd import errors

log = logging.getLogger(__name__)

NAMES = frozenset(
    {
        "before_update_device",
        "after_update_device",
        "after_update_device_fail",
        "before_nic_hotplug",
        "after_nic_hotplug",
        "after_nic_hotplug_fail",
        "before_nic_hotunplug",
        "after_nic_hotunplug",
        "after_nic_hotunplug_fail",
    }
)
DOMXML = "_hook_domxml"  # VDSM's variable naming the XML file
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STOP = 2
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RESERVED = re.compile(
    r"PATH|IFS|HOME|ENV|BASH_ENV|SHELLOPTS|_hook_domxml|LD_.*|PYTHON.*|BASH_FUNC_.*"
)


@dataclass(frozen=True)
class _Outcome:
    code: int
    stderr: str
    problem: str


def environment(custom: Mapping[str, str]) -> dict[str, str]:
    """Custom properties as environment variables: names sanitized, none that steers a program.

    Characters outside ``[A-Za-z0-9_]`` become ``_`` (``vnic-id`` -> ``vnic_id``); a name
    that would set PATH, HOME, IFS, the XML file or a loader/interpreter variable, or a value
    with a NUL, is refused as an invalid parameter naming the property.
    """
    env = {}
    for name, value in custom.items():
        key = re.sub(r"[^A-Za-z0-9_]", "_", name)
        if not _ENV_NAME.fullmatch(key):
            key = f"_{key}"
        if _RESERVED.fullmatch(key):
            raise errors.InvalidParameter(
                f"custom.{name}", f"{name!r} is a reserved name for a hook's environment"
            )
        if "\0" in value:
            raise errors.InvalidParameter(f"custom.{name}", f"{name!r} holds a NUL character")
        if key in env:
            raise errors.InvalidParameter(
                f"custom.{name}", f"{name!r} and another property are both ${key}"
            )
        env[key] = value
    return env


class Hooks:
    def __init__(self, directory: Path, timeout: float) -> None:
        self.directory = directory
        self.timeout = timeout

    def configure(self, directory: Path, timeout: float) -> None:
        """New settings (a reload); hooks already running keep the old ones."""
        self.directory = directory
        self.timeout = timeout

    def scripts(self, name: str) -> list[Path]:
        """``name``'s executables, in name order; none when its directory is missing. A
        directory that cannot be read is the hook's failure, not an absent hook."""
        if name not in NAMES:
            raise ValueError(f"unknown hook {name!r}")
        try:
            with os.scandir(os.path.join(self.directory, name)) as entries:
                found = [
                    Path(e.path) for e in entries if e.is_file() and os.access(e.path, os.X_OK)
                ]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise errors.HookError(name, "*", f"cannot be read: {e.strerror or e}") from e
        return sorted(found, key=lambda p: p.name)

    def present(self, names: Iterable[str]) -> dict[str, list[Path]]:
        """Those of hooks ``names`` that have scripts now, with their scripts. One look at
        the hooks directory when none has a directory of its own: a request takes this
        once, not once per hook it could run (blocking: directory reads)."""
        wanted = set(names)
        try:
            with os.scandir(self.directory) as entries:
                named = sorted(e.name for e in entries if e.name in wanted and e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return {}
        found = {name: self.scripts(name) for name in named}
        return {name: scripts for name, scripts in found.items() if scripts}

    async def run(
        self,
        name: str,
        xml: str,
        env: Mapping[str, str] | None = None,
        scripts: list[Path] | None = None,
    ) -> str:
        """Run hook ``name`` on ``xml`` and return the XML as its scripts left it.

        ``env`` holds the request's custom properties (see :func:`environment`);
        ``scripts``: the hook's scripts as looked up already (default: looked up now).
        Raises :class:`vnicd.errors.HookError` when a ``before_`` script fails; the caller
        checks that a rewritten XML still names the same device.
        """
        scripts = self.scripts(name) if scripts is None else scripts
        if not scripts:
            return xml
        script_env = {"PATH": os.environ.get("PATH", DEFAULT_PATH), **environment(env or {})}
        fd, path = tempfile.mkstemp(prefix=f"vnicd-{name}-", suffix=".xml")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(xml)
            script_env[DOMXML] = path
            failure = await self._run_all(name, scripts, script_env)
            if failure is not None and name.startswith("before_"):
                script, outcome = failure
                raise errors.HookError(name, script, outcome.problem, outcome.stderr)
            return Path(path).read_text(encoding="utf-8")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def _run_all(
        self, name: str, scripts: list[Path], env: dict[str, str]
    ) -> tuple[str, _Outcome] | None:
        """Run the scripts in order; the first failure, if any."""
        first: tuple[str, _Outcome] | None = None
        for script in scripts:
            outcome = await self._run_one(name, script, env)
            if outcome.code == 0:
                continue
            first = first or (script.name, outcome)
            if outcome.code == STOP:
                break
        return first

    async def _run_one(self, name: str, script: Path, env: dict[str, str]) -> _Outcome:
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                str(script),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd="/",
                start_new_session=True,  # its own process group: a timeout kills its children
            )
        except OSError as e:  # removed, or no longer executable, since it was looked up
            log.warning("hook %s/%s could not be started: %s", name, script.name, e)
            return _Outcome(1, "", f"could not be started: {e.strerror or e}")
        try:
            _out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            await _kill(proc)
            log.error("hook %s/%s killed after %.3g s", name, script.name, self.timeout)
            return _Outcome(STOP, "", f"timed out after {self.timeout:g} s and was killed")
        finally:
            if proc.returncode is None:  # cancelled: leave nothing running
                await _kill(proc)
        stderr = err.decode(errors="replace")
        code = proc.returncode
        ms = (time.monotonic() - started) * 1000
        if code == 0:
            log.info("hook %s/%s succeeded in %.0f ms", name, script.name, ms)
            return _Outcome(0, stderr, "")
        if code is None or code < 0:
            problem = f"was killed by signal {-(code or 0)}"
            code = STOP
        else:
            problem = f"failed with exit code {code}"
            if code > STOP:
                log.warning("hook %s/%s: unexpected exit code %d", name, script.name, code)
        log.warning("hook %s/%s %s in %.0f ms: %s", name, script.name, problem, ms, stderr.strip())
        return _Outcome(code, stderr, problem)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the script's process group and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()
