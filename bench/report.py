"""Figures of one run: medians, p99, ratios, the machine, and a picture."""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def p99(samples: list[float]) -> float:
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


@dataclass
class Results:
    """Seconds per sample, by measure and method; curves for the picture."""

    context: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # (number of VMs, method) -> median seconds of a link change; same by concurrent clients
    by_vms: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    by_clients: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    list_by_vms: list[tuple[int, float]] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)

    def add(self, measure: str, method: str, seconds: float) -> None:
        self.samples.setdefault(measure, {}).setdefault(method, []).append(seconds)

    def median(self, measure: str, method: str) -> float | None:
        found = self.samples.get(measure, {}).get(method)
        return statistics.median(found) if found else None

    def p99(self, measure: str, method: str) -> float | None:
        found = self.samples.get(measure, {}).get(method)
        return p99(found) if found else None


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release()}


def _ms(value: float | None, scale: float = 1000.0, unit: str = "ms") -> str:
    if value is None:
        return "n/a"
    return f"{value * scale:.2f} {unit}" if scale != 1 else f"{value:.2f} {unit}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


SINGLE = ("link toggle", "bridge move")
ENGINE = "vnicd, engine wire"
CHECKED = "raw libvirt, checked"
METHODS = ("raw libvirt", "vnicd", ENGINE, "virsh")
BULK = (
    "raw libvirt, 8 threads",
    "raw libvirt checked, 8 threads",
    "vnicd, pipelined",
    "vnicd, bulk verb",
    "virsh loop",
)


def table(r: Results) -> str:
    c = r.context
    lines = [
        f"vnicd benchmark, {c['date']}, commit {c['commit']}",
        f"machine: {c['cpu']}, {c['cores']} cores, kernel {c['kernel']}",
        f"libvirt {c['libvirt']}, QEMU {c['qemu']}, URI {c['uri']}; vnicd runs {c['vnicd_runs']}",
        f"{c['vms']} paused VMs x {c['nics']} vNICs, "
        f"{'persistent' if c['persistent'] else 'transient'}, {c['rounds']} rounds interleaved"
        + (f"; {c['note']}" if c.get("note") else ""),
        "",
        "| single change | raw libvirt median / p99 | vnicd (Unix socket) median / p99 "
        "| vnicd (engine wire, TLS) median / p99 | virsh median / p99 "
        "| vnicd/raw median / p99 | engine wire/raw median / p99 | virsh/vnicd median |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ratios(measure: str, method: str) -> str:
        return (
            f"**{_ratio(r.median(measure, method), r.median(measure, 'raw libvirt'))}** / "
            f"{_ratio(r.p99(measure, method), r.p99(measure, 'raw libvirt'))}"
        )

    for measure in SINGLE:
        cells = [f"{_ms(r.median(measure, m))} / {_ms(r.p99(measure, m))}" for m in METHODS]
        sv = _ratio(r.median(measure, "virsh"), r.median(measure, "vnicd"))
        lines.append(
            f"| {measure} | {' | '.join(cells)} | {ratios(measure, 'vnicd')} "
            f"| {ratios(measure, ENGINE)} | {sv} |"
        )
    lines += ["", *_floor(r)]
    total = c["vms"] * c["nics"]
    lines += [
        "",
        f"| all {total} vNICs down, then up | median | min | runs |",
        "|---|---|---|---|",
    ]
    for method in BULK:
        found = r.samples.get("all down+up", {}).get(method)
        if found:
            lines.append(
                f"| {method} | {_ms(statistics.median(found), 1, 's')} "
                f"| {_ms(min(found), 1, 's')} | {len(found)} |"
            )
        else:
            lines.append(f"| {method} | n/a | n/a | 0 |")
    med = {m: r.median("all down+up", m) for m in BULK}
    lines += [
        "",
        f"ratios (all vNICs): vnicd pipelined / raw = "
        f"{_ratio(med['vnicd, pipelined'], med['raw libvirt, 8 threads'])}, "
        f"bulk verb / raw = {_ratio(med['vnicd, bulk verb'], med['raw libvirt, 8 threads'])}, "
        f"virsh / vnicd pipelined = {_ratio(med['virsh loop'], med['vnicd, pipelined'])}, "
        f"virsh / bulk verb = {_ratio(med['virsh loop'], med['vnicd, bulk verb'])}, "
        f"raw checked / raw = "
        f"{_ratio(med['raw libvirt checked, 8 threads'], med['raw libvirt, 8 threads'])}, "
        f"bulk verb / raw checked = "
        f"{_ratio(med['vnicd, bulk verb'], med['raw libvirt checked, 8 threads'])}",
        "",
        "| vnicd | value |",
        "|---|---|",
        f"| Host.getVMList with {c['vms']} VMs, median / p99 | "
        f"{_ms(r.median('getVMList', 'vnicd'))} / {_ms(r.p99('getVMList', 'vnicd'))} |",
    ]
    lines += [f"| {k} | {v} |" for k, v in r.figures.items()]
    return "\n".join(lines)


def _floor(r: Results) -> list[str]:
    """What vnicd's guarantees cost by themselves: the raw script with the status read and
    the kernel's confirmation, plus a round trip to vnicd that does nothing (its median
    ``Host.ping2``), against the raw script; then vnicd against that floor."""
    lines = [
        "| single change, medians | raw libvirt | raw libvirt, checked (/raw) "
        "| Host.ping2: Unix socket / engine wire "
        "| checked + ping: Unix socket (/raw) | checked + ping: engine wire (/raw) "
        "| vnicd / (checked + ping): Unix socket / engine wire |",
        "|---|---|---|---|---|---|---|",
    ]
    ping, wire_ping = r.median("ping", "vnicd"), r.median("ping", ENGINE)
    for measure in SINGLE:
        raw, checked = r.median(measure, "raw libvirt"), r.median(measure, CHECKED)
        unix = None if checked is None or ping is None else checked + ping
        wire = None if checked is None or wire_ping is None else checked + wire_ping
        lines.append(
            f"| {measure} | {_ms(raw)} | {_ms(checked)} ({_ratio(checked, raw)}) "
            f"| {_ms(ping)} / {_ms(wire_ping)} | {_ms(unix)} (**{_ratio(unix, raw)}**) "
            f"| {_ms(wire)} (**{_ratio(wire, raw)}**) "
            f"| {_ratio(r.median(measure, 'vnicd'), unix)} / "
            f"{_ratio(r.median(measure, ENGINE), wire)} |"
        )
    return lines


def plot(r: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90)
    for method, style in (("vnicd", "o-"), ("raw libvirt", "s--")):
        points = r.by_vms.get(method, [])
        if points:
            left.plot([n for n, _ in points], [s * 1000 for _, s in points], style, label=method)
        points = r.by_clients.get(method, [])
        if points:
            right.plot([n for n, _ in points], [s * 1000 for _, s in points], style, label=method)
    if r.list_by_vms:
        left.plot(
            [n for n, _ in r.list_by_vms],
            [s * 1000 for _, s in r.list_by_vms],
            "^:",
            label="vnicd Host.getVMList",
        )
    left.set(xlabel="paused VMs on the host", ylabel="median ms", title="link change vs VMs")
    right.set(
        xlabel="concurrent clients", ylabel="median ms per change", title="link change vs clients"
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
    fig.suptitle(f"vnicd vs raw libvirt-python, {r.context['uri_kind']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
