"""vnic-client: vnicd's debug CLI.

The generic form is built from the API schema, as ``vdsm-client`` does:
``vnic-client VM updateDevice vmID=UUID params='{...}'``. Short forms cover what a
person types: ``list``, ``nics VM``, ``link VM NIC up|down``, ``wire VM NIC NETWORK``.
vdsm-client's options work in its order (``-a HOST``, ``-p``, ``--insecure``,
``--timeout``, ``--flow-id``, ``-f FILE|-`` before the namespace): with ``-a`` the CLI
speaks the engine wire (STOMP, mutual TLS) instead of the local socket.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vnicd import names
from vnicd.client import Client, RpcClient, RpcError, StompClient, tls_client_context
from vnicd.domxml import Domain, XMLError
from vnicd.schema import Schema, Verb

DEFAULT_SOCKET = Path("/run/vnicd/vnicd.sock")
DEFAULT_PKI = {
    "cert_file": "/etc/pki/vnicd/certs/vnicdcert.pem",
    "key_file": "/etc/pki/vnicd/keys/vnicdkey.pem",
    "ca_file": "/etc/pki/vnicd/certs/cacert.pem",
}


class UsageError(Exception):
    pass


def _parse_value(schema: Schema, verb: Verb, key: str, text: str) -> Any:
    spec = verb.params.get(key)
    if spec is None:
        raise UsageError(f"{verb.name} has no parameter {key!r} (has: {', '.join(verb.params)})")
    if schema.resolve(spec).get("type", "string") == "string":
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{key}: not valid JSON: {e}") from e


def _generic_params(schema: Schema, verb: Verb, args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    source = args.method_file or args.file
    if source:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
        loaded = json.loads(text)
        if not isinstance(loaded, dict):
            raise UsageError("-f: expected a JSON object of parameters")
        params.update(loaded)
    for item in args.params:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"{item!r}: expected NAME=VALUE")
        params[key] = _parse_value(schema, verb, key, value)
    return params


def _vm_id(client: RpcClient, vm: str) -> str:
    if names.is_uuid(vm):
        return vm
    matches = [v["vmID"] for v in client.call("Host.getVMList") if v["vmName"] == vm]
    if not matches:
        raise UsageError(f"no VM named {vm!r}")
    return str(matches[0])


def _nic(nic: str) -> dict[str, str]:
    return {"macAddr": nic} if names.is_mac(nic) else {"alias": nic}


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


_NIC_COLUMNS = [
    "ALIAS",
    "MAC",
    "MODEL",
    "NETWORK",
    "BRIDGE",
    "LINK",
    "PLUGGED",
    "PCI",
    "TAP",
    "FILTER",
]


def _nics_table(vm: dict[str, Any]) -> str:
    rows = [
        [
            n["alias"] or "-",
            n["macAddr"],
            n["nicModel"],
            "(none)" if n["network"] is None else n["network"] or "(unwired)",
            n["bridge"] or "-",
            "up" if n["linkActive"] else "down",
            "yes" if n["plugged"] else "no",
            n["pciAddress"] or "-",
            n["tap"] or "-",
            n["filter"] or "-",
        ]
        for n in vm["nics"]
    ]
    return f"{vm['vmName']} ({vm['vmID']}) {vm['status']}\n" + _table(rows, _NIC_COLUMNS)


def _vms_table(vms: list[dict[str, Any]]) -> str:
    rows = [
        [v["vmID"], v["vmName"], v["status"], str(len(v["nics"]))]
        for v in sorted(vms, key=lambda v: str(v["vmName"]))
    ]
    return _table(rows, ["VM ID", "NAME", "STATUS", "NICS"])


def _update(client: RpcClient, vm: str, nic: str, dry_run: bool, **change: Any) -> Any:
    params = {"deviceType": "interface", **_nic(nic), **change, **_dry(dry_run)}
    return client.call("VM.updateDevice", vmID=_vm_id(client, vm), params=params)


def _dry(dry_run: bool) -> dict[str, bool]:
    return {"dryRun": True} if dry_run else {}


def _state_lines(nic: dict[str, Any] | None) -> list[str]:
    if nic is None:
        return []
    return [f"{key}: {json.dumps(value)}" for key, value in nic.items()]


def _xml_lines(xml: str | None) -> list[str]:
    return [] if xml is None else [line.rstrip() for line in xml.strip().splitlines()]


def plan_text(plan: dict[str, Any]) -> str:
    """A dry run as a person reads it: the steps, then what changes, as unified diffs."""
    out = [
        f"dry run: {plan['action']} vNIC {plan['nic']} of VM {plan['vmID']}; nothing was changed",
        "steps:",
        *(f"  {i}. {step}" for i, step in enumerate(plan["steps"], 1)),
    ]
    if not plan["steps"]:
        out.append("  (none: it is already so)")
    diffs = [
        ("state", _state_lines(plan["before"]), _state_lines(plan["after"])),
        ("live <interface>", _xml_lines(plan["beforeXML"]), _xml_lines(plan["liveXML"])),
    ]
    if plan["definitionXML"] is not None:
        diffs.append(("definition <interface>", [], _xml_lines(plan["definitionXML"])))
    for title, old, new in diffs:
        if old == new:
            continue
        out += difflib.unified_diff(
            old, new, f"{title} now", f"{title} after", lineterm="", n=max(len(old), len(new))
        )
    return "\n".join(out)


def _vm_or_plan(result: Any) -> str:
    return plan_text(result) if result.get("dryRun") else _nics_table(result)


BULK_CHUNK = 8  # VMs per call when a terminal shows progress
WIRE_TIMEOUT = 60.0  # seconds, on the engine wire, as vdsm-client waits


def _bulk(client: RpcClient, args: argparse.Namespace) -> Any:
    """Host.bulkUpdateNics; on a terminal in chunks of VMs, with progress on stderr."""
    match: dict[str, Any] = {}
    if args.network is not None:
        match["network"] = args.network
    if args.vm:
        match["vmIDs"] = [_vm_id(client, vm) for vm in args.vm]
    if not match:
        raise UsageError("bulk: name the vNICs with --network and/or --vm")
    change: dict[str, Any] = (
        {"linkActive": args.link == "up"} if args.link else {"network": args.to}
    )
    if args.bounce is not None:
        change["linkBounce"] = args.bounce
    call = functools.partial(client.call, "Host.bulkUpdateNics", change=change)
    if args.dry_run or not sys.stderr.isatty():
        return call(match=match, **_dry(args.dry_run))
    targets = call(match=match, dryRun=True)["results"]
    vms = sorted({r["vmID"] for r in targets if r["ok"]})
    # refused VMs are told from the dry run; the others' refusals come again with them
    results = [r for r in targets if not r["ok"] and r["vmID"] not in vms]
    for i in range(0, len(vms), BULK_CHUNK):
        results += call(match={**match, "vmIDs": vms[i : i + BULK_CHUNK]})["results"]
        print(f"\rvnic-client: {len(results)}/{len(targets)} vNICs", end="", file=sys.stderr)
    print(f"\rvnic-client: {len(results)} vNICs changed or refused, as listed", file=sys.stderr)
    return {"results": results}


def _bulk_table(result: Any) -> str:
    rows = []
    for r in result["results"]:
        if not r["ok"]:
            outcome = f"error {r['error']['code']}: {r['error']['message']}"
        elif "plan" in r:
            outcome = "would: " + "; ".join(r["plan"]["steps"]) if r["plan"]["steps"] else "as is"
        else:
            nic = r["nic"]
            outcome = (
                f"{nic['network'] or '(unwired)'} link {'up' if nic['linkActive'] else 'down'}"
            )
        rows.append([r["vmID"], r["alias"] or "-", r["macAddr"] or "-", outcome])
    return _table(rows, ["VM ID", "ALIAS", "MAC", "RESULT"])


def _short_forms(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sub.add_parser("list", help="VMs on this host")
    p = sub.add_parser("nics", help="a VM's vNICs")
    p.add_argument("vm", help="VM name or UUID")
    p = sub.add_parser("link", help="plug or pull a vNIC's virtual cable")
    p.add_argument("vm", help="VM name or UUID")
    p.add_argument("nic", help="alias or MAC")
    p.add_argument("state", choices=["up", "down"])
    p = sub.add_parser("wire", help="move a vNIC to a network ('' unwires it)")
    p.add_argument("vm", help="VM name or UUID")
    p.add_argument("nic", help="alias or MAC")
    p.add_argument("network")
    p.add_argument("--bounce", action=argparse.BooleanOptionalAction, help="link bounce")
    for verb, text in (("plug", "plug a vNIC back into the guest"), ("unplug", "unplug a vNIC")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("vm", help="VM name or UUID")
        p.add_argument("nic", help="alias or MAC")
    for name in ("link", "wire", "plug", "unplug"):
        sub.choices[name].add_argument(
            "--dry-run", action="store_true", help="show what would change; change nothing"
        )
    p = sub.add_parser("create", help="create and start a VM from a libvirt domain XML file")
    p.add_argument("xml", type=Path)
    p.add_argument("--persistent", action="store_true", help="define it, not transient")
    p = sub.add_parser("destroy", help="stop a VM (a transient one is gone then)")
    p.add_argument("vm", help="VM name or UUID")
    p.add_argument("--undefine", action="store_true", help="also remove its definition")
    sub.add_parser("caps", help="vnicd version and the networks of this host")
    p = sub.add_parser("bulk", help="relink or move every vNIC on a network and/or of some VMs")
    p.add_argument("--network", help="the vNICs on this network ('' for the unwired ones)")
    p.add_argument("--vm", action="append", default=[], help="the vNICs of this VM (repeat)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--link", choices=["up", "down"])
    what.add_argument("--to", metavar="NETWORK", help="move them to this network")
    p.add_argument("--bounce", action=argparse.BooleanOptionalAction, help="link bounce")
    p.add_argument("--dry-run", action="store_true", help="show what would change")


def _run_short(client: RpcClient, args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    nics: Callable[[Any], str] = _vm_or_plan
    if args.command == "list":
        return client.call("Host.getVMList"), _vms_table
    if args.command == "nics":
        return client.call("VM.getInfo", vmID=_vm_id(client, args.vm)), _nics_table
    if args.command == "link":
        return _update(client, args.vm, args.nic, args.dry_run, linkActive=args.state == "up"), nics
    if args.command == "wire":
        bounce = {} if args.bounce is None else {"linkBounce": args.bounce}
        return _update(
            client, args.vm, args.nic, args.dry_run, network=args.network, **bounce
        ), nics
    if args.command in ("plug", "unplug"):
        verb = "VM.hotplugNic" if args.command == "plug" else "VM.hotunplugNic"
        params = {**_nic(args.nic), **_dry(args.dry_run)}
        return client.call(verb, vmID=_vm_id(client, args.vm), params=params), nics
    if args.command == "create":
        text = args.xml.read_text()
        try:
            uuid = Domain(text).uuid
        except XMLError as e:
            raise UsageError(f"{args.xml}: {e}") from e
        if not uuid:
            raise UsageError(f"{args.xml}: the domain XML needs a <uuid>")
        vm_params = {"xml": text, "persistent": args.persistent}
        return client.call("VM.create", vmID=uuid, vmParams=vm_params), nics
    if args.command == "destroy":
        client.call("VM.destroy", vmID=_vm_id(client, args.vm), undefine=args.undefine)
        return {}, lambda _r: "destroyed and undefined" if args.undefine else "destroyed"
    if args.command == "bulk":
        return _bulk(client, args), _bulk_table
    caps = client.call("Host.getCapabilities")

    def caps_text(c: Any) -> str:
        rows = [[n["name"], n["type"], n["bridge"]] for n in c["networks"]]
        return f"vnicd {c['version']} on {c['libvirtURI']}\n" + _table(
            rows, ["NETWORK", "TYPE", "BRIDGE"]
        )

    return caps, caps_text


def build_parser(schema: Schema) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vnic-client",
        description="Talk to vnicd. Generic form: vnic-client NAMESPACE METHOD NAME=VALUE ...",
    )
    parser.add_argument("--socket", type=Path, default=DEFAULT_SOCKET, help="vnicd's socket")
    parser.add_argument("--json", action="store_true", help="short forms: print JSON, not tables")
    wire = parser.add_argument_group("the engine wire (as vdsm-client)")
    wire.add_argument("-a", "--host", help="talk STOMP to vnicd on HOST instead of the socket")
    wire.add_argument("-p", "--port", type=int, default=54321, help="port (default 54321)")
    wire.add_argument(
        "--insecure",
        "--unsecure",
        dest="use_tls",
        action="store_false",
        help="plain TCP instead of mutual TLS",
    )
    wire.add_argument(
        "--timeout",
        type=float,
        help=f"seconds to wait for an answer (default {WIRE_TIMEOUT:g} on the engine wire, "
        "none on the socket)",
    )
    wire.add_argument("--flow-id", help="flow id for vnicd's log lines about the call")
    for name, default in DEFAULT_PKI.items():
        option = "--" + name.replace("_", "-")
        wire.add_argument(option, type=Path, default=Path(default), help=f"default {default}")
    parser.add_argument(
        "-f", "--file", help="generic form: JSON object of all parameters ('-' for stdin)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _short_forms(sub)
    namespaces: dict[str, argparse._SubParsersAction] = {}  # type: ignore[type-arg]
    for verb in schema.verbs.values():
        if verb.namespace not in namespaces:
            ns = sub.add_parser(verb.namespace, help=f"{verb.namespace} verbs (generic form)")
            namespaces[verb.namespace] = ns.add_subparsers(
                dest="method", required=True, metavar="METHOD"
            )
        params = ", ".join(
            f"{k}{'' if spec.get('required') else '?'}" for k, spec in verb.params.items()
        )
        p = namespaces[verb.namespace].add_parser(
            verb.method, help=verb.description, description=f"{verb.description} ({params})"
        )
        p.add_argument("params", nargs="*", metavar="NAME=VALUE", help=params or "no parameters")
        p.add_argument(
            "-f", "--file", dest="method_file", help="JSON object of all parameters ('-' for stdin)"
        )
    return parser


def _connect(args: argparse.Namespace) -> RpcClient:
    if args.host is None:
        if args.flow_id:
            raise UsageError("--flow-id needs -a HOST: the local socket carries no flow id")
        try:  # without --timeout, as long as vnicd takes: it answers every call it took
            return Client(args.socket, timeout=args.timeout)
        except OSError as e:
            raise OSError(f"cannot reach vnicd at {args.socket}: {e.strerror or e}") from e
    tls = tls_client_context(args.cert_file, args.key_file, args.ca_file) if args.use_tls else None
    timeout = WIRE_TIMEOUT if args.timeout is None else args.timeout
    return StompClient(args.host, args.port, tls=tls, timeout=timeout, flow_id=args.flow_id)


def main(argv: list[str] | None = None) -> int:
    schema = Schema.load()
    args = build_parser(schema).parse_args(argv)
    try:
        with _connect(args) as client:
            if args.command in {v.namespace for v in schema.verbs.values()}:
                verb = schema.verbs[f"{args.command}.{args.method}"]
                result = client.call(verb.name, **_generic_params(schema, verb, args))
                print(json.dumps(result, indent=2))
            else:
                if args.file:
                    raise UsageError("-f is for the generic form (NAMESPACE METHOD)")
                result, render = _run_short(client, args)
                print(json.dumps(result, indent=2) if args.json else render(result))
                if args.command == "bulk":
                    failed = sum(1 for r in result["results"] if not r["ok"])
                    if failed:
                        print(f"vnic-client: {failed} vNICs not changed", file=sys.stderr)
                        return 1
    except RpcError as e:
        print(f"vnic-client: error {e.code}: {e.message}", file=sys.stderr)
        return 1
    except (UsageError, OSError, ValueError) as e:
        print(f"vnic-client: {e}", file=sys.stderr)
        return 1
    return 0
