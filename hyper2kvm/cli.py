"""The `hyper2kvm` command: inspect, convert and import VMs without a daemon."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.errors import HypersdkError
from core.paths import safe_name
from hyper2kvm import __version__, ova
from hyper2kvm.convert import convert_staged
from hyper2kvm.detect import detect_format
from hyper2kvm.ovf import parse_ovf
from hyper2kvm.staging import describe_source, stage_export
from hyper2kvm.vmdk import parse_vmdk


def _inspect(source: Path) -> dict[str, Any]:
    if not source.is_file():
        raise HypersdkError(f"{source} is not a file")
    if source.suffix == ".ova":
        members = ova.read_members(source)
        descriptor = next(m for name, m in members.items() if name.endswith(".ovf"))
        return {
            "kind": "ova",
            "members": {name: {"offset": m.offset, "size": m.size}
                        for name, m in members.items()},
            "vm": parse_ovf(ova.read_member(source, descriptor)).vm.model_dump(mode="json"),
            "vmdk": {name: parse_vmdk(source, offset=m.offset, size=m.size).as_dict()
                     for name, m in members.items() if name.endswith(".vmdk")},
        }
    if source.suffix == ".ovf":
        return {"kind": "ovf", "vm": parse_ovf(source.read_bytes()).vm.model_dump(mode="json")}
    fmt = detect_format(source)
    if fmt == "vmdk":
        return {"kind": "vmdk", **parse_vmdk(source).as_dict()}
    return {"kind": "disk", "format": fmt, "size": source.stat().st_size}


@contextmanager
def _progress(label: str, *, quiet: bool) -> Iterator[tuple[Callable[[int], None],
                                                            Callable[[int], None]]]:
    """(on_start, advance) callbacks: a rich bar on a terminal, plain lines otherwise."""
    if quiet:
        yield (lambda _total: None), (lambda _n: None)
        return
    if sys.stderr.isatty():
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        with Progress("[bold]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), TimeRemainingColumn(), transient=False) as bar:
            task = bar.add_task(label, total=None)
            yield ((lambda total: bar.update(task, total=total)),
                   (lambda n: bar.advance(task, n)))
        return
    state = {"total": 0, "done": 0, "shown": -1.0}

    def on_start(total: int) -> None:
        state["total"] = total

    def advance(n: int) -> None:
        state["done"] += n
        percent = 100.0 * state["done"] / state["total"] if state["total"] else 0.0
        if percent - state["shown"] >= 10 or percent >= 100:
            state["shown"] = percent
            print(f"{label}: {percent:5.1f}% ({state['done']}/{state['total']} bytes)",
                  file=sys.stderr, flush=True)

    yield on_start, advance


def _convert(args: argparse.Namespace) -> dict[str, Any]:
    source = Path(args.source).absolute()
    export = describe_source(source)
    # the source's folder, and folders named with --source-root, are all it may read
    roots = [source.parent, *(Path(root) for root in args.source_root)]
    staged = stage_export(export, roots)
    started = time.monotonic()
    with _progress(f"convert {export.vm.name}", quiet=args.json) as (on_start, advance):
        folder = Path(args.output_dir) / safe_name(export.vm.name)
        disks = convert_staged(staged, folder, output_format=args.format,
                               compress=args.compress, preallocation=args.preallocation,
                               checksum=args.checksum, on_start=on_start, progress=advance)
    result: dict[str, Any] = {
        "vm": export.vm.model_dump(mode="json"),
        "output_dir": str(folder),
        "seconds": round(time.monotonic() - started, 3),
        "disks": [d.model_dump(mode="json") for d in disks],
    }
    return result


def _import(args: argparse.Namespace) -> dict[str, Any]:
    from hyper2kvm.importing import import_disk

    registered, _fmt = import_disk(
        args.uri, Path(args.disk).resolve(), roots=None, name=args.name, memory_mb=args.memory_mb,
        vcpus=args.vcpus, network=args.network, firmware=args.firmware,
        autostart=args.autostart, replace=args.replace, compat=args.compat)
    return {"name": registered.name, "uuid": registered.uuid, "uri": registered.uri,
            "autostart": registered.autostart}


def _sample(args: argparse.Namespace) -> dict[str, Any]:
    from hyper2kvm.sample import make_sample_ova

    path = make_sample_ova(Path(args.directory), args.name, size_mib=args.size_mib,
                           random_mib=args.random_mib)
    return {"path": str(path), "size": path.stat().st_size}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="hyper2kvm", description=__doc__)
    root.add_argument("--version", action="version", version=f"hyper2kvm {__version__}")
    commands = root.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="print the parsed VMDK/OVF/OVA metadata")
    inspect.add_argument("source")
    inspect.add_argument("--json", action="store_true", help="JSON only (the default output)")

    convert = commands.add_parser("convert", help="convert an OVA, OVF or disk image")
    convert.add_argument("source")
    convert.add_argument("--output-dir", required=True)
    convert.add_argument("--format", choices=["qcow2", "raw"], default="qcow2")
    convert.add_argument("--compress", action="store_true", help="compressed qcow2 (zstd)")
    convert.add_argument("--preallocation", choices=["off", "metadata", "falloc", "full"])
    convert.add_argument("--checksum", action="store_true", help="SHA-256 of each output")
    convert.add_argument("--json", action="store_true", help="no progress; JSON result only")
    convert.add_argument("--source-root", action="append", default=[], metavar="DIR",
                         help="a folder backing files may also be in (besides the source's)")

    imp = commands.add_parser("import", help="define a libvirt domain around a disk")
    imp.add_argument("--name", required=True)
    imp.add_argument("--disk", required=True)
    imp.add_argument("--memory-mb", type=int, default=2048)
    imp.add_argument("--vcpus", type=int, default=2)
    imp.add_argument("--network", default="default")
    imp.add_argument("--firmware", choices=["bios", "efi"], default="bios")
    imp.add_argument("--autostart", action="store_true")
    imp.add_argument("--replace", action="store_true")
    imp.add_argument("--compat", action="store_true",
                     help="SATA disk and e1000 NIC, for guests without virtio drivers")
    imp.add_argument("--uri", default="qemu:///system")
    imp.add_argument("--json", action="store_true")

    sample = commands.add_parser("make-sample", help="write a small sample OVA to migrate")
    sample.add_argument("directory")
    sample.add_argument("--name", default="sample-vm")
    sample.add_argument("--size-mib", type=int, default=64)
    sample.add_argument("--random-mib", type=int, default=0)
    sample.add_argument("--json", action="store_true")
    daemon = commands.add_parser("daemon", help="convert jobs dropped into a watch directory")
    daemon.add_argument("--watch-dir", required=True)
    daemon.add_argument("--output-dir", required=True)
    daemon.add_argument("--format", choices=["qcow2", "raw"], default="qcow2")
    daemon.add_argument("--compress", action="store_true")
    daemon.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    daemon.add_argument("--instance", default=None, help="a name for logs (hyper2kvm@NAME)")
    daemon.add_argument("--workers", type=int, default=2, help="jobs at once")
    daemon.add_argument("--poll", type=float, default=1.0, help="seconds between scans")
    daemon.add_argument("--source-root", action="append", default=[], metavar="DIR",
                        help="a folder jobs may read from (repeatable; default: the "
                             "export, image and inbox folders of HYPERSDK_CONFIG)")
    return root


COMMANDS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "inspect": lambda args: _inspect(Path(args.source)),
    "convert": _convert,
    "import": _import,
    "make-sample": _sample,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "daemon":
        # the daemon runs each job as a Prefect flow run: the flows room provides it
        import importlib

        return int(importlib.import_module("flows.watch_daemon").run(args))
    try:
        result = COMMANDS[args.command](args)
    except HypersdkError as exc:
        print(f"hyper2kvm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hyper2kvm: interrupted; partial output removed", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=None if args.json else 2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
