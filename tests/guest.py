"""A tiny Linux test guest that reports, from inside, what its NICs look like.

The image (Debian cloud kernel + busybox initramfs) is built at set-up by
``contrib/build-test-guest``; its ``/init`` is ``contrib/test-guest-init``. Boot it with the
:func:`cmdline` parameters and a serial console written to a file, then read that file with
:class:`Console`.

Report format (one "round" every 0.2 s on the console, one line per NIC, all on ``ttyS0``)::

    VNICD-GUEST seq=N uptime=S.SS nics=K idx=I if=eth0 mac=52:54:00:aa:bb:01 carrier=0|1 \
        oper=up|down|... slot=0000:00:03.0 ping=ok|fail|none ping_n=A ping_t=T.TT end

(a single line per NIC, ``idx`` 0..K-1, all lines of a round share ``seq``), or, when the
guest has no NIC at all::

    VNICD-GUEST seq=N uptime=S.SS nics=0 ping=ok|fail|none ping_n=A ping_t=T.TT end

``uptime`` is the guest's /proc/uptime at the start of the round. ``slot`` is the PCI address
of the NIC (``-`` if unknown). ``ping`` is the result of the most recent *completed* ping
attempt, ``ping_n`` its attempt number (0 with ``ping=none`` before the first attempt or
without a peer) and ``ping_t`` the guest uptime at which that attempt started, so "an
attempt started after guest time T failed" is ``ping == "fail" and ping_t > T``. Each attempt
is ``ping -c 1 -W 1``: a lost reply takes ~1 s to show. Lines are only trusted when they end
with ``end`` (kernel messages can cut a line). ``VNICD-LOG`` lines are diagnostics.

Kernel command line parameters (see :func:`cmdline`): ``vnicd.addr=MAC,IP/PREFIX[,PEER]``
(repeatable; applied each time a NIC with that MAC appears, also after hot-plug; with PEER
that NIC pings PEER through itself), ``vnicd.peer=IP`` (global peer, routed),
``vnicd.interval=SECONDS``, ``vnicd.kmsg=1`` (do not silence kernel console messages).

Under this machine's nested KVM (``kvm_pvm``) a Linux guest does not boot (KVM "emulation
failure" at the kernel's int3 self-test or at cmpxchg16b, whatever the CPU model): use domain
type ``qemu`` (TCG). Measured: qemu start to first report ~2.0 s for one guest, ~5 s for two
booting at once on 2 cores; via libvirt's embedded driver ~6 s for the first domain of a
fresh root (includes QEMU capability probing).

NIC models: the cloud kernel has drivers for virtio-net (libvirt model ``virtio``) and
``vmxnet3`` only; it has no e1000, e1000e, rtl8139 or pcnet driver. PCI hot-plug and unplug
(ACPI, machine ``pc``) work: the guest acknowledges ``device_del`` in ~0.2 s.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from xml.etree import ElementTree
from xml.sax.saxutils import escape, quoteattr

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "contrib" / "build-test-guest"
INIT_SCRIPT = REPO_ROOT / "contrib" / "test-guest-init"
DEFAULT_CACHE_DIR = Path("/var/cache/vnicd/test-guest")
REPORT_PREFIX = "VNICD-GUEST "

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class GuestError(Exception):
    """The test guest image could not be built or its arguments are invalid."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


def find_image(cache_dir: Path = DEFAULT_CACHE_DIR) -> GuestImage:
    """The guest kernel and initrd that the host set-up built, read only.

    Building needs the network, which the test namespace does not have: the set-up
    (``contrib/setup-host --tests``) builds it, and an image built from other recipes is
    refused here rather than silently used.
    """
    fix = "run `contrib/setup-host --tests` (contrib/run-tests does) to build it"
    current = cache_dir / "current"
    image = GuestImage(kernel=current / "vmlinuz", initrd=current / "initrd.gz")
    if not (image.kernel.is_file() and image.initrd.is_file()):
        raise GuestError(f"no test guest image in {current}: {fix}")
    recipe = hashlib.sha256(BUILD_SCRIPT.read_bytes() + INIT_SCRIPT.read_bytes()).hexdigest()
    info = dict(
        line.split("=", 1) for line in (current / "info").read_text().splitlines() if "=" in line
    )
    if info.get("recipe_hash") != recipe[:8]:
        raise GuestError(f"the test guest image in {current} is from other recipes: {fix}")
    return image


def _norm_mac(mac: str) -> str:
    norm = mac.strip().lower()
    if not _MAC_RE.match(norm):
        raise GuestError(f"not a MAC address: {mac!r}")
    return norm


def cmdline(
    addrs: Mapping[str, str],
    peer: str | None = None,
    *,
    nic_peers: Mapping[str, str] | None = None,
    interval: float | None = None,
    kmsg: bool = False,
    extra: Sequence[str] = (),
) -> str:
    """Kernel command line for the test guest.

    ``addrs`` maps MAC -> "ip/prefix" applied whenever a NIC with that MAC appears;
    ``peer`` is pinged (routed) and reported on every NIC line without a per-NIC peer;
    ``nic_peers`` maps MAC -> peer pinged through that NIC only (needs an entry in
    ``addrs``). Console messages from the kernel are silenced unless ``kmsg``.
    """
    parts = ["console=ttyS0", "loglevel=1", "panic=-1"]
    nic_peers = {_norm_mac(m): p for m, p in (nic_peers or {}).items()}
    for mac, addr in addrs.items():
        mac = _norm_mac(mac)
        try:
            iface = ipaddress.ip_interface(addr)
        except ValueError as exc:
            raise GuestError(f"not an ip/prefix: {addr!r}") from exc
        if "/" not in addr:
            raise GuestError(f"missing prefix length: {addr!r}")
        item = f"vnicd.addr={mac},{iface.with_prefixlen}"
        if mac in nic_peers:
            item += f",{ipaddress.ip_address(nic_peers.pop(mac))}"
        parts.append(item)
    if nic_peers:
        raise GuestError(f"nic_peers without an address in addrs: {sorted(nic_peers)}")
    if peer is not None:
        parts.append(f"vnicd.peer={ipaddress.ip_address(peer)}")
    if interval is not None:
        if interval <= 0:
            raise GuestError(f"interval must be positive: {interval}")
        parts.append(f"vnicd.interval={interval:g}")
    if kmsg:
        parts.append("vnicd.kmsg=1")
    parts.extend(extra)
    return " ".join(parts)


@dataclass(frozen=True)
class GuestReport:
    """One report line. NIC fields are None on the ``nics=0`` line."""

    seq: int
    uptime: float
    nics: int
    ping: str
    ping_n: int
    ping_t: float
    idx: int | None = None
    ifname: str | None = None
    mac: str | None = None
    carrier: int | None = None
    oper: str | None = None
    slot: str | None = None

    def ping_failed_after(self, guest_time: float) -> bool:
        """True if an attempt that started after ``guest_time`` (guest uptime) failed."""
        return self.ping == "fail" and self.ping_t > guest_time

    def ping_ok_after(self, guest_time: float) -> bool:
        """True if an attempt that started after ``guest_time`` (guest uptime) succeeded."""
        return self.ping == "ok" and self.ping_t > guest_time


def parse_report_line(line: str) -> GuestReport | None:
    """Parse one console line; None if it is not a complete, well-formed report."""
    start = line.find(REPORT_PREFIX)
    if start < 0:
        return None
    tokens = line[start + len(REPORT_PREFIX) :].split()
    if not tokens or tokens[-1] != "end":
        return None
    fields: dict[str, str] = {}
    for token in tokens[:-1]:
        key, sep, value = token.partition("=")
        if not sep:
            return None
        fields[key] = value
    try:
        base = GuestReport(
            seq=int(fields["seq"]),
            uptime=float(fields["uptime"]),
            nics=int(fields["nics"]),
            ping=fields["ping"],
            ping_n=int(fields["ping_n"]),
            ping_t=float(fields["ping_t"]),
        )
        if base.nics == 0:
            return base
        return replace(
            base,
            idx=int(fields["idx"]),
            ifname=fields["if"],
            mac=fields["mac"].lower(),
            carrier=int(fields["carrier"]),
            oper=fields["oper"],
            slot=None if fields["slot"] == "-" else fields["slot"],
        )
    except (KeyError, ValueError):
        return None


@dataclass(frozen=True)
class ReportRound:
    """All report lines sharing one ``seq``: the guest's NICs at one instant."""

    seq: int
    uptime: float
    lines: tuple[GuestReport, ...]
    reports: dict[str, GuestReport] = field(default_factory=dict)  # by MAC

    @property
    def nics(self) -> int:
        return len(self.lines) if self.lines[0].nics else 0

    def __str__(self) -> str:
        return "\n".join(_format(r) for r in self.lines)


def _format(r: GuestReport) -> str:
    if r.nics == 0:
        return (
            f"seq={r.seq} uptime={r.uptime:.2f} nics=0 ping={r.ping} "
            f"ping_n={r.ping_n} ping_t={r.ping_t:.2f}"
        )
    return (
        f"seq={r.seq} uptime={r.uptime:.2f} nics={r.nics} if={r.ifname} mac={r.mac} "
        f"carrier={r.carrier} oper={r.oper} slot={r.slot} ping={r.ping} "
        f"ping_n={r.ping_n} ping_t={r.ping_t:.2f}"
    )


class Console:
    """Reads a guest's growing console log file and groups report lines into rounds."""

    def __init__(self, path: Path, history: int = 10000) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self._pending: list[GuestReport] = []
        self._rounds: deque[ReportRound] = deque(maxlen=history)

    def poll(self) -> None:
        """Read what was appended to the file."""
        try:
            with self.path.open("rb") as f:
                size = f.seek(0, 2)
                if size < self._offset:  # truncated: a new guest wrote over it
                    self._offset, self._partial, self._pending = 0, b"", []
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        for raw in chunks:
            report = parse_report_line(raw.decode("utf-8", errors="replace").rstrip("\r"))
            if report is not None:
                self._add(report)

    def _add(self, report: GuestReport) -> None:
        if self._pending and (
            self._pending[0].seq != report.seq or report.idx != len(self._pending)
        ):
            self._pending = []  # incomplete round (cut line): drop it
        if report.nics == 0:
            self._complete([report])
            return
        if report.idx != len(self._pending):
            return
        self._pending.append(report)
        if len(self._pending) == report.nics:
            self._complete(self._pending)
            self._pending = []

    def _complete(self, lines: list[GuestReport]) -> None:
        reports = {r.mac: r for r in lines if r.mac is not None}
        rnd = ReportRound(lines[0].seq, lines[0].uptime, tuple(lines), reports)
        self._rounds.append(rnd)

    def latest_round(self) -> ReportRound | None:
        """The last complete round in the file (after reading what is new)."""
        self.poll()
        return self._rounds[-1] if self._rounds else None

    def rounds(self) -> list[ReportRound]:
        """All complete rounds still in the history."""
        self.poll()
        return list(self._rounds)


def guest_domain_xml(
    name: str,
    uuid: str,
    domain_type: str,
    image: GuestImage,
    cmdline: str,
    console_log: Path,
    nics_xml: list[str],
    memory_mib: int = 256,
) -> str:
    """A libvirt domain XML booting the test guest directly (no disk).

    ``domain_type`` must be "qemu" (TCG) on this machine: under its nested KVM
    (kvm_pvm) the Linux guest dies with "KVM internal error ... emulation failure" with
    every CPU model tried, so "kvm" is accepted but will not boot here. ``nics_xml`` are
    ``<interface>`` elements inserted verbatim (add ``<rom enabled='no'/>`` to skip iPXE's
    option ROM, and fixed ``<address type='pci' .../>`` for predictable slots). The
    console is a file (the serial port); memballoon and USB are disabled so they take no
    PCI slot, and the guest's reboot/crash/poweroff all destroy the domain.
    """
    if domain_type not in ("qemu", "kvm"):
        raise GuestError(f"domain_type must be 'qemu' or 'kvm', not {domain_type!r}")
    for snippet in nics_xml:
        ElementTree.fromstring(snippet)  # raises on malformed snippets
    interfaces = "\n    ".join(nics_xml)
    xml = f"""<domain type={quoteattr(domain_type)}>
  <name>{escape(name)}</name>
  <uuid>{escape(uuid)}</uuid>
  <memory unit='MiB'>{int(memory_mib)}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <serial type='file'>
      <source path={quoteattr(str(console_log))}/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path={quoteattr(str(console_log))}/>
      <target type='serial' port='0'/>
    </console>
    {interfaces}
  </devices>
</domain>
"""
    ElementTree.fromstring(xml)
    return xml
