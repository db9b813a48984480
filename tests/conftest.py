"""Session fixtures: the test host (a network namespace), vnicd, and VMs that never outlive a test.

vnicd runs twice per session, one driver after the other: on libvirt's embedded QEMU driver,
then on ``qemu:///system`` through a libvirtd of the session's own (tests/libvirtd.py),
started for it and stopped with it. Every test that uses it runs on both (ids ``[embedded]``
and ``[system]``); pytest orders the tests so that each driver's vnicd is set up once.

Real-VM tests (those using a fixture of ``HOST_FIXTURES``) need root, /dev/net/tun, libvirt's QEMU
driver and, for guest tests, the test guest image the set-up built; where one is missing
the session stops with a clear message instead of skipping. Pure-logic tests need none.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest

from tests import pki
from tests.guest import GuestError, find_image
from tests.harness import DaemonThread, SchemaClient
from tests.hostenv import PREFIX, TestHost, kill_qemus, sweep_stale
from tests.libvirtd import PrivateLibvirtd
from vnicd.config import Config, EngineConfig
from vnicd.networks import Target

TMP = Path(tempfile.gettempdir())
CHECKOUT = Path(__file__).resolve().parent.parent
# TCG: under this machine's nested KVM an idle firmware now and then stops with "KVM
# internal error", which libvirt rightly reports as a paused VM; under TCG it never does.
DOMAIN_TYPE = "qemu"
BRIDGES = ("vt-a", "vt-b", "vt-c")
# Tests using any of these boot VMs, run vnicd or make network devices: they need root and
# the test namespace.
HOST_FIXTURES = {"vnicd", "state", "workdir", "libvirtd", "devices"}
DRIVERS = ("embedded", "system")
# Free: the session has its own network namespace. One port per driver, so the two vnicds
# never contend for it, whatever order their tests run in.
ENGINE_PORTS = {"embedded": 54321, "system": 54322}
_host = TestHost()


def pytest_configure(config: pytest.Config) -> None:
    """Programs the tests start (the virtualenv's ``vnicd`` and ``vnic-client``, whose
    virtualenv may have been installed from another checkout) import this checkout's vnicd."""
    paths = [str(CHECKOUT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Set up the test host, once, only when a collected test needs real VMs.

    Pure-logic tests run without root. Everything a real-VM run needs from the network
    (the test guest image) was fetched by the set-up: the namespace entered here has none,
    so a missing piece stops the run with one message instead of failing test by test.
    """
    real = [i for i in session.items if HOST_FIXTURES & set(getattr(i, "fixturenames", ()))]
    if not real:
        return
    if os.geteuid() != 0:
        pytest.exit("vnicd's real-VM tests boot VMs on bridges: run them as root", 4)
    if any(item.get_closest_marker("guest") for item in real):
        try:
            find_image()
        except GuestError as e:
            pytest.exit(str(e), 4)
    sweep_stale(TMP)
    _host.enter()
    for name in BRIDGES:
        _host.bridge(name)


def pytest_unconfigure(config: pytest.Config) -> None:
    _host.leave()


def remove(dom: libvirt.virDomain) -> None:
    """Stop a VM and drop its definition, whichever of the two it still has."""
    with contextlib.suppress(libvirt.libvirtError):
        dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefine()


@pytest.fixture(scope="session", params=DRIVERS)
def vnicd(request: pytest.FixtureRequest) -> Iterator[DaemonThread]:
    """vnicd in this session's namespace, on the embedded driver or on a private libvirtd."""
    driver: str = request.param
    state = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-{driver}-", dir=TMP))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, state, ignore_errors=True)
        cleanup.callback(kill_qemus, str(state))
        libvirtd = None
        if driver == "system":
            libvirtd = PrivateLibvirtd(state / "libvirtd")
            cleanup.callback(libvirtd.close)
            libvirtd.start()
        certs = pki.make(state / "pki")
        config = Config(
            libvirt_uri=libvirtd.unix_uri if libvirtd else "",
            state_dir=state,
            unix_socket=state / "vnicd.sock",
            log_level="DEBUG",
            workers=8,
            unplug_timeout=2.0,
            link_bounce_seconds=1.0,
            networks={"lab": Target("bridge", "vt-c")},
            engine=EngineConfig(
                enabled=True,
                address="127.0.0.1",
                port=ENGINE_PORTS[driver],
                cert_file=certs.server.cert,
                key_file=certs.server.key,
                ca_file=certs.ca,
                resync_interval=0.5,
            ),
        )
        daemon = DaemonThread(config, libvirtd)
        cleanup.callback(daemon.stop)
        cleanup.callback(remove_all, daemon)
        daemon.start()
        yield daemon


def remove_all(daemon: DaemonThread) -> None:
    """Every VM of a running vnicd's libvirt gone (the session's own libvirt only)."""
    if daemon.daemon is not None:
        for dom in daemon.conn.listAllDomains(0):
            remove(dom)


@pytest.fixture
def rpc(vnicd: DaemonThread) -> Iterator[SchemaClient]:
    with vnicd.client() as client:
        yield client


@dataclass
class Nic:
    """A vNIC for a test VM; MAC and tap name are made unique per session."""

    bridge: str
    model: str = "virtio"
    link_up: bool | None = None
    mac: str = ""
    tap: str = ""
    extra: str = ""


_serial = itertools.count(1)


def nic_xml(nic: Nic) -> str:
    link = "" if nic.link_up is None else f"<link state='{'up' if nic.link_up else 'down'}'/>"
    return (
        f"<interface type='bridge'><mac address='{nic.mac}'/><source bridge='{nic.bridge}'/>"
        f"<target dev='{nic.tap}'/><model type='{nic.model}'/>{link}{nic.extra}</interface>"
    )


def vm_xml(name: str, vm_id: str, nics: list[Nic], devices: str = "") -> str:
    """A VM with no OS: starts in about a second and has real PCI NICs, taps and QMP."""
    return f"""<domain type='{DOMAIN_TYPE}'>
  <name>{name}</name><uuid>{vm_id}</uuid>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>{"".join(nic_xml(n) for n in nics)}{devices}</devices>
</domain>"""


@dataclass
class Vms:
    """Creates VMs through vnicd and destroys whatever a test leaves."""

    vnicd: DaemonThread
    created: list[str] = field(default_factory=list)

    def nic(self, nic: Nic) -> Nic:
        n = next(_serial)
        nic.mac = nic.mac or f"52:54:00:7e:{n // 256:02x}:{n % 256:02x}"
        nic.tap = nic.tap or f"vtap{os.getpid() % 1000}-{n}"
        return nic

    def xml(self, *nics: Nic, name: str | None = None) -> tuple[str, str]:
        vm_id = str(uuid.uuid4())
        name = name or f"vm-{vm_id[:8]}"
        return vm_id, vm_xml(name, vm_id, [self.nic(n) for n in nics])

    def create(self, *nics: Nic, persistent: bool = False) -> str:
        vm_id, xml = self.xml(*nics)
        with self.vnicd.client() as c:
            c.call("VM.create", vmID=vm_id, vmParams={"xml": xml, "persistent": persistent})
        self.created.append(vm_id)
        return vm_id

    def cleanup(self) -> None:
        if self.vnicd.daemon is None:
            return
        for vm_id in self.created:
            with contextlib.suppress(libvirt.libvirtError):
                remove(self.vnicd.domain(vm_id))


@pytest.fixture
def vms(vnicd: DaemonThread) -> Iterator[Vms]:
    made = Vms(vnicd)
    vnicd.removed.clear()
    try:
        yield made
    finally:
        made.cleanup()
