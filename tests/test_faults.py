"""Faults under load: libvirtd killed mid-burst, vnicd killed mid-burst.

Each test records every request and its answer, then checks every vNIC where it lives
(live XML, definition, stored unplugged copy, kernel) against what vnicd reports and what
its answers promised. ``VNICD_ABUSE=long`` runs longer bursts with more kills; the figures
are printed (``pytest -s``).
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests import faults, test_service
from tests.conftest import Nic, vm_xml
from tests.faults import LONG, Answer, Burst, NicTruth
from tests.libvirtd import PrivateLibvirtd
from tests.test_libvirtd import MARKER, private_libvirtd, workdir
from vnicd.client import Client, RpcError
from vnicd.errors import GeneralError, UpdateDeviceFailed

__all__ = ["workdir"]  # a fixture, used by name
Params = dict[str, Any]
UNWIRED = "vt-unwired6"
NETWORKS = ("vt-a", "vt-b", "vt-c")


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[PrivateLibvirtd]:
    """One private libvirtd for this module's tests (each removes its VMs): it takes
    seconds to start."""
    with private_libvirtd() as daemon:
        yield daemon


def write_config(workdir: Path, uri: str, extra: str = "", libvirt: str = "") -> Path:
    path = workdir / "vnicd.yml"
    path.write_text(
        f"libvirt: {{uri: '{uri}'{libvirt}}}\nstate_dir: {workdir}\n"
        f"rpc: {{unix_socket: {workdir / 'vnicd.sock'}}}\nunwired_bridge: {UNWIRED}\n"
        f"unplug_timeout: 1\nlink_bounce: {{seconds: 1}}\n{extra}"
    )
    return path


def make_vms(
    sock: Path, count: int, tag: str, persistent: Callable[[int], bool], nics: int = 2
) -> dict[str, list[str]]:
    """``count`` VMs with no OS, created through vnicd (a few at once); their MACs by id."""
    vms: dict[str, list[str]] = {}
    pid = os.getpid() % 100000

    def create(i: int) -> None:
        vm_id = str(uuid.uuid4())
        macs = [f"52:54:00:{tag}:{i:02x}:{n:02x}" for n in range(nics)]
        xml = vm_xml(
            f"{MARKER}-{tag}{i}",
            vm_id,
            [Nic("vt-a", mac=m, tap=f"f{tag}{pid}-{i}{n}") for n, m in enumerate(macs)],
        )
        with Client(sock, timeout=120) as c:
            c.call("VM.create", vmID=vm_id, vmParams={"xml": xml, "persistent": persistent(i)})
        vms[vm_id] = macs

    pending = list(range(count))
    while pending:
        batch, pending = pending[:4], pending[4:]
        threads = [threading.Thread(target=create, args=(i,)) for i in batch]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(vms) == count, "a VM was not created"
    return vms


def updates(rng: random.Random, vms: dict[str, list[str]]) -> Iterator[tuple[str, str, Params]]:
    """Link toggles and moves between bridges, on random vNICs of ``vms``, without end."""
    ids = sorted(vms)
    while True:
        vm = rng.choice(ids)
        params: dict[str, Any] = {"deviceType": "interface", "macAddr": rng.choice(vms[vm])}
        kind = rng.randrange(3)
        if kind != 1:
            params["linkActive"] = rng.random() < 0.5
        if kind != 0:
            params["network"] = rng.choice(NETWORKS)
        yield vm, "VM.updateDevice", {"params": params}


def last_promises(answers: list[Answer], unwired: str) -> dict[str, dict[str, NicTruth]]:
    """Per VM, every vNIC as the last successful answer about the VM stated it."""
    found: dict[str, dict[str, NicTruth]] = {}
    for a in sorted((a for a in answers if a.result is not None), key=lambda a: a.received):
        found[a.vm] = {n["macAddr"]: faults.promised(n, unwired) for n in a.result["nics"]}
    return found


def test_libvirtd_killed_mid_burst(libvirtd: PrivateLibvirtd, workdir: Path) -> None:
    """1,000 updates (more in long mode) over 20 VMs from 5 connections; libvirtd SIGKILLed
    part way and restarted: every request answered, vnicd serving within 2 s of libvirtd's
    return, every vNIC where its last successful answer put it, every place agreeing."""
    rng = faults.seeded("libvirtd mid-burst")
    sock = workdir / "vnicd.sock"
    log = (workdir / "vnicd.log").open("w")
    proc = faults.launch(write_config(workdir, libvirtd.uri), log)
    kills = 3 if LONG else 1
    verbs = 1000 * kills
    clients = 5
    try:
        faults.wait_serving(sock, proc)
        created = time.monotonic()
        vms = make_vms(sock, 20, "f1", lambda i: i % 2 == 0)
        conn = libvirt.open(libvirtd.unix_uri)
        for vm_id in vms:  # paused VMs take live changes alike, and leave the CPUs alone
            conn.lookupByUUIDString(vm_id).suspend()
        conn.close()
        print(f"20 VMs created and paused in {time.monotonic() - created:.1f} s")
        initial = {}
        with Client(sock) as c:
            for vm_id in vms:
                info = c.call("VM.getInfo", vmID=vm_id)
                initial[vm_id] = {n["macAddr"]: faults.promised(n, UNWIRED) for n in info["nics"]}

        # each client owns its VMs: one vNIC's requests are answered in the order sent
        ids = sorted(vms)
        plans = [
            updates(random.Random(rng.random()), {v: vms[v] for v in ids[k::clients]})
            for k in range(clients)
        ]
        burst = Burst(sock)
        started = time.monotonic()
        threads = burst.run(plans)
        outages: list[tuple[float, float]] = []  # (killed, answering again)
        for k in range(kills):
            mark = verbs * (k + 0.3) / kills
            faults.until("burst progress", lambda: burst.done() >= mark, 120)  # noqa: B023
            libvirtd.kill()
            killed = time.monotonic()
            time.sleep(rng.uniform(0.5, 1.5))
            libvirtd.start()
            outages.append((killed, time.monotonic()))
        enough = burst.done() + verbs * 0.3 / kills
        faults.until("burst progress", lambda: burst.done() >= max(verbs, enough), 120)
        burst.stop.set()
        for t in threads:
            t.join(300)
            assert not t.is_alive(), "a client still waits for an answer"
        elapsed = time.monotonic() - started

        answers = burst.answers
        assert len(answers) >= verbs
        assert not [a for a in answers if a.lost], "a request went unanswered"
        codes = collections.Counter(
            "ok" if a.error is None else f"error {a.error.code}" for a in answers
        )
        unclear = [
            a
            for a in answers
            if a.error is not None
            and (
                a.error.code not in (GeneralError.code, UpdateDeviceFailed.code)
                or not a.error.message
            )
        ]
        assert not unclear, [(a.error.code, a.error.message) for a in unclear if a.error]
        slowest = max(a.received - a.sent for a in answers)
        back = []
        for _killed, returned in outages:
            after = [a.received for a in answers if a.result is not None and a.received > returned]
            back.append(min(after, default=float("inf")) - returned)
        print(
            f"{len(answers)} verbs, {clients} clients, 20 VMs, {elapsed:.1f} s: {dict(codes)}; "
            f"slowest answer {slowest:.2f} s; libvirtd killed {kills}x, outages "
            f"{[round(r - k, 2) for k, r in outages]} s, serving again after "
            f"{[round(b, 2) for b in back]} s"
        )
        print("errors:", collections.Counter(a.error.message[:150] for a in answers if a.error))
        assert max(back) <= 2.0, f"vnicd served again only after {back} s"

        faults.wait_serving(sock, proc)
        truths, problems = faults.check_all(libvirtd.unix_uri, sock, UNWIRED)
        assert not problems, problems
        promises = {**initial, **last_promises(answers, UNWIRED)}
        wrong = {
            (vm, mac): (truths[vm][mac], promise)
            for vm, nics in promises.items()
            for mac, promise in nics.items()
            if truths[vm][mac] != promise
        }
        assert not wrong, f"{len(wrong)} vNICs not as last promised (now, promised): {wrong}"
    finally:
        test_service.stop(proc)
        log.close()
        faults.remove_vms(libvirtd.unix_uri)


def test_change_cut_by_lost_libvirtd_is_undone(libvirtd: PrivateLibvirtd, workdir: Path) -> None:
    """libvirtd stops answering while vnicd's update is with it (a hook stops it just
    before): the update is answered with an error that says the previous state comes back;
    reads say the previous state; once libvirtd is back vnicd restores it, whether libvirtd
    carried out the update or not, in the live XML, the definition and the kernel."""
    assert libvirtd.proc is not None
    hook = workdir / "hooks" / "before_update_device" / "50_stop_libvirtd"
    hook.parent.mkdir(parents=True)
    hook.write_text(f'#!/bin/sh\nrm -f "$0"\nkill -STOP {libvirtd.proc.pid}\n')
    hook.chmod(0o755)
    sock = workdir / "vnicd.sock"
    log_path = workdir / "vnicd.log"
    log = log_path.open("w")
    extra = f"hooks: {{dir: {workdir / 'hooks'}}}\n"
    keepalive = ", keepalive_interval: 1, keepalive_count: 2"
    proc = faults.launch(write_config(workdir, libvirtd.uri, extra, keepalive), log)
    try:
        faults.wait_serving(sock, proc)
        (vm_id, (mac,)) = make_vms(sock, 1, "f2", lambda i: True, nics=1).popitem()
        with Client(sock) as c:
            before = c.call("VM.getInfo", vmID=vm_id)
            params = {"deviceType": "interface", "macAddr": mac, "network": "vt-b"}
            with pytest.raises(RpcError) as e:
                c.call("VM.updateDevice", vmID=vm_id, params={**params, "linkActive": False})
            assert e.value.code == UpdateDeviceFailed.code and e.value.data["rolledBack"] is False
            assert "restores the previous state once libvirt answers" in e.value.message
            assert c.call("VM.getInfo", vmID=vm_id) == before, "reads: the state being restored"
        libvirtd.pause(False)
        faults.wait_serving(sock, proc)
        test_service.wait_for(log_path, "the change that failed earlier is undone", 30)
        with Client(sock) as c:
            assert c.call("VM.getInfo", vmID=vm_id) == before
        truths, problems = faults.check_all(libvirtd.unix_uri, sock, UNWIRED)
        assert not problems, problems
        assert truths[vm_id][mac] == NicTruth(True, "vt-a", True)
    finally:
        libvirtd.pause(False)
        test_service.stop(proc)
        log.close()
        faults.remove_vms(libvirtd.unix_uri)


def changes(
    rng: random.Random, vms: dict[str, list[str]], running: set[str]
) -> Iterator[tuple[str, str, Params]]:
    """Every kind of vNIC change, without end: links, moves (unwired too, bounced on a
    running VM), unplugs and plugs (a guest with no OS never releases a vNIC: an unplug of
    a running VM's vNIC waits for it, times out and leaves it plugged)."""
    ids = sorted(vms)
    while True:
        vm = rng.choice(ids)
        mac = rng.choice(vms[vm])
        kind = rng.randrange(10)
        if kind < 2:
            yield vm, "VM.hotunplugNic", {"params": {"macAddr": mac}}
        elif kind < 4:
            yield vm, "VM.hotplugNic", {"params": {"macAddr": mac}}
        else:
            params: Params = {"deviceType": "interface", "macAddr": mac}
            if kind < 7:
                params["linkActive"] = rng.random() < 0.6
            if kind >= 6:
                params["network"] = rng.choice((*NETWORKS, ""))
            if kind == 9 and vm in running:
                params["linkBounce"] = True
            yield vm, "VM.updateDevice", {"params": params}


def test_vnicd_killed_mid_burst(libvirtd: PrivateLibvirtd, workdir: Path) -> None:
    """vnicd SIGKILLed at random points of a burst of every kind of change, on persistent
    (running and stopped) and transient VMs, one running VM with a vNIC unplugged, and
    restarted: every vNIC reported in its true state, none half changed (live XML,
    definition, stored unplugged copy, kernel and vnicd's report agree), and every vNIC of
    a VM whose requests were all answered is as the last successful answer said."""
    rng = faults.seeded("vnicd mid-burst")
    rounds = 10 if LONG else 3
    sock = workdir / "vnicd.sock"
    log = (workdir / "vnicd.log").open("w")
    config = write_config(workdir, libvirtd.uri)
    proc = faults.launch(config, log)
    totals: collections.Counter[str] = collections.Counter()
    try:
        faults.wait_serving(sock, proc)
        vms = make_vms(sock, 8, "f3", lambda i: i < 5, nics=3)
        ids = sorted(vms, key=lambda v: vms[v][0])  # in creation order: 0-4 persistent
        conn = libvirt.open(libvirtd.unix_uri)
        try:
            for vm_id in ids[:3]:  # stopped, still defined
                conn.lookupByUUIDString(vm_id).destroy()
            with Client(sock) as c:  # the first VM gets a vNIC unplugged, then runs
                c.call("VM.hotunplugNic", vmID=ids[0], params={"macAddr": vms[ids[0]][2]})
            conn.lookupByUUIDString(ids[0]).create()
            running = set(ids) - set(ids[1:3])
            for vm_id in running:
                conn.lookupByUUIDString(vm_id).suspend()
        finally:
            conn.close()
        for n in range(rounds):
            faults.wait_serving(sock, proc)
            burst = Burst(sock)
            plans = [
                changes(random.Random(rng.random()), {v: vms[v] for v in ids[k::4]}, running)
                for k in range(4)
            ]
            threads = burst.run(plans, pause_after_error=0.0)
            time.sleep(rng.uniform(0.3, 2.5))
            proc.kill()
            proc.wait()
            # stamped once vnicd is dead: a client thread may send between a stamp taken
            # before the kill and the kill itself (this thread waits for the GIL), and
            # vnicd may have begun that request
            killed = time.monotonic()
            burst.stop.set()
            for t in threads:
                t.join(30)
            # requests sent after the kill could not connect: only these were cut
            cut = [a for a in burst.answers if a.sent < killed and a.result is a.error is None]
            sent = [a for a in burst.answers if a.sent < killed]
            totals["requests"] += len(sent)
            totals["cut by the kill"] += len(cut)
            totals.update(
                "ok" if a.error is None else f"error {a.error.code}"
                for a in sent
                if a.result is not None or a.error is not None
            )
            proc = faults.launch(config, log)
            faults.wait_serving(sock, proc)
            truths, problems = faults.check_all(libvirtd.unix_uri, sock, UNWIRED)
            assert not problems, f"after kill {n + 1}: {problems}"
            promises = last_promises(burst.answers, UNWIRED)
            wrong = {
                vm: (truths[vm], promise)
                for vm, promise in promises.items()
                if vm not in {a.vm for a in cut} and truths[vm] != promise
            }
            assert not wrong, f"after kill {n + 1}, not as last answered: {wrong}"
        print(f"vnicd SIGKILLed {rounds}x mid-burst, every vNIC agreed after each: {dict(totals)}")
    finally:
        test_service.stop(proc)
        log.close()
        faults.remove_vms(libvirtd.unix_uri)
