"""A Hyper-V host stand-in for the tests. No WinRM server, nor PowerShell with the Hyper-V
module, runs on Linux, and no real Hyper-V host was used.

* WS-Management, the WinRM shell protocol (Create, Command, Receive, Signal, Delete of
  the `windows/shell/cmd` resource) over HTTPS, driven by the real pywinrm client.
  Authentication is checked on every connection: NTLM by pyspnego's acceptor (with the
  TLS channel binding checked, as WinRM's CBT hardening does), or Basic; anything else
  is answered 401. Every response relates to its request's MessageID.
* The command must be `powershell ... -EncodedCommand <base64 UTF-16LE>`, within cmd.exe's
  8,191 characters (longer: "The command line is too long.", exit code 1); its script is
  run by a small interpreter of PowerShell's grammar as far as the provider uses it
  (statements split by `;` and newlines, pipelines, single-quoted literals with doubled
  quotes, arrays, `@( )`, switches) and exactly the cmdlets the provider sends. A term it
  does not know, a parameter a cmdlet does not have, or a string left open is an error,
  reported as PowerShell does (CLIXML on stderr, exit code 1). `Remove-VM` is there too,
  so that an injected command would do damage a test can see.
* Cmdlets answer with the properties Microsoft documents for their output objects, with
  the types Windows PowerShell 5.1's `ConvertTo-Json` gives them (enums as numbers, Guids
  as strings). These examples are written from that documentation, not captured from a
  host:
    Get-VM           {"Name":"web","Id":"5a2d...","State":3,"ProcessorCount":2,
                      "MemoryStartup":2147483648,"Generation":2,"Path":"C:\\\\Hyper-V",
                      "Notes":"env=prod"}           State 2 Running, 3 Off
    Get-VMFirmware   {"SecureBoot":0,"SecureBootTemplate":"MicrosoftWindows"}  0 On, 1 Off
    Get-VMHardDiskDrive {"ControllerType":1,"ControllerNumber":0,"ControllerLocation":0,
                      "Path":"D:\\\\VMs\\\\web.vhdx"}                 0 IDE, 1 SCSI
    Get-VHD          {"Path":"...","VhdFormat":3,"VhdType":3,"Size":1073741824,
                      "FileSize":4194304,"ParentPath":""}  format 2 VHD, 3 VHDX; type 2
                      Fixed, 3 Dynamic, 4 Differencing
    Get-VMNetworkAdapter {"Name":"Network Adapter","MacAddress":"00155D0A0B0C",
                      "SwitchName":"External","IPAddresses":["10.0.0.5","fe80::1"]}
    Get-VMDvdDrive   {"ControllerNumber":1,"ControllerLocation":0,"Path":null}
    Get-VMSnapshot   {"Name":"before-upgrade","ParentSnapshotName":null}
* Files are real: a VM's disks live in the Samba share's folder (the host calls it
  `SHARE_PATH`) or in a folder the share does not reach (`HOST_PATH`). `Export-VM` copies
  a VM's disk files into `<Path>\\<VM name>\\Virtual Hard Disks`, `Convert-VHD` of a
  checkpoint's `.avhdx` writes the disk's current state as a standalone VHDX (the
  stand-in keeps that state beside the chain: it cannot merge differencing VHDX files
  itself, and neither can qemu-img, so the `.avhdx` files it serves hold no disk).
  `New-VHD` makes a real (empty) VHDX. The Hyper-V services write a UNC path as the
  host's computer account: `computer_account_may_write` says whether the file server's
  share lets it (Export-VM, Convert-VHD and New-VHD there are denied otherwise).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import spnego
from spnego.channel_bindings import GssChannelBindings
from spnego.exceptions import SpnegoError

SHARE_PATH = "D:\\Shares\\HyperV"
SHARE_NAME = "hyperv"  # the share's name on the SMB server
CMD_LIMIT = 8191  # cmd.exe's longest command line, which WinRM's cmd shell runs through
HOST_PATH = "C:\\ProgramData\\Microsoft\\Windows\\Hyper-V"
NS = {"s": "http://www.w3.org/2003/05/soap-envelope",
      "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
      "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
      "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"}
SHELL_URI = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
STATES = {"Running": 2, "Off": 3}
QUOTES = "'\u2018\u2019\u201a\u201b"


class PSError(Exception):
    """A PowerShell error: the script stops, the message goes to stderr."""


# ---------------------------------------------------------------------------- the host

@dataclass
class Vhd:
    path: str  # the host's name of the file
    format: int  # 2 VHD, 3 VHDX
    type: int  # 2 Fixed, 3 Dynamic, 4 Differencing
    size: int
    parent: str | None = None
    current: Path | None = None  # a differencing leaf: the disk's state now, as a VHDX


@dataclass
class VM:
    id: str
    name: str
    state: str
    cpus: int
    memory: int
    generation: int
    notes: str
    secure_boot: bool
    disks: list[str]  # host paths of the files the VM writes (newest of each chain)
    macs: list[str]
    switch: str
    dvd: bool
    checkpoints: list[tuple[str, str | None]]
    # physical disks of the host attached as pass-through: (disk number, size in GB)
    passthrough: list[tuple[int, int]] = field(default_factory=list)


def _set(event: threading.Event) -> threading.Event:
    event.set()
    return event


@dataclass
class Host:
    share_dir: Path  # the Samba share's folder, SHARE_PATH to the host
    host_dir: Path  # a folder the share does not reach, HOST_PATH to the host
    private_dir: Path  # what the stand-in keeps for itself (disks' current states)
    vms: dict[str, VM] = field(default_factory=dict)
    vhds: dict[str, Vhd] = field(default_factory=dict)  # by lower-cased host path
    scripts: list[str] = field(default_factory=list)  # every script run, decoded
    actions: list[str] = field(default_factory=list)  # power and file actions taken
    export_seconds: float = 0.0  # how long Export-VM takes
    # Export-VM finishes only once this is set (a test holds an export open with it)
    export_gate: threading.Event = field(default_factory=lambda: _set(threading.Event()))
    # whether the share's ACL lets the host's computer account (HOST$) write: the Hyper-V
    # services (Export-VM, Convert-VHD, New-VHD) write a UNC path as that account
    computer_account_may_write: bool = True
    lock: threading.RLock = field(default_factory=threading.RLock)

    def local(self, host_path: str) -> Path:
        """The real file behind a host path under SHARE_PATH or HOST_PATH, or the share's
        UNC (\\<server>\hyperv: the host reaches it as its computer account)."""
        unc = re.match(r"^\\\\[^\\]+\\" + SHARE_NAME + r"(?=\\|$)", host_path, re.I)
        if unc:
            host_path = SHARE_PATH + host_path[unc.end():]
        for root, folder in ((SHARE_PATH, self.share_dir), (HOST_PATH, self.host_dir)):
            if host_path.lower() == root.lower():
                return folder
            if host_path.lower().startswith(root.lower() + "\\"):
                rest = host_path[len(root) + 1:].split("\\")
                return folder.joinpath(*rest)
        raise PSError(f"Cannot find path '{host_path}' because it does not exist.")

    def writable(self, cmdlet: str, host_path: str) -> Path:
        """The file behind a path the Hyper-V services are to write, refused as Windows
        refuses it where the path is the file server's and HOST$ may not write there."""
        if host_path.startswith("\\\\") and not self.computer_account_may_write:
            raise PSError(f"{cmdlet} : Failed to create '{host_path}'. General access denied "
                          "error ('0x80070005').")
        return self.local(host_path)

    def vhd(self, host_path: str) -> Vhd:
        found = self.vhds.get(host_path.lower())
        if found is None or not self.local(host_path).exists():
            raise PSError(f"Get-VHD : The system cannot find the file specified. ({host_path})")
        return found

    def add_vm(self, name: str, disks: list[Path], *, on_share: bool = True,
               state: str = "Off", cpus: int = 2, memory_mb: int = 2048, generation: int = 2,
               secure_boot: bool = False, notes: str = "", macs: tuple[str, ...] = (),
               checkpoint_states: list[Path] | None = None) -> VM:
        """A VM whose disks are copies of `disks` (VHDX files). With `checkpoint_states`,
        each disk has a checkpoint: its base is the given file as it was, its newest file
        an .avhdx, and its current state the matching file of `checkpoint_states`."""
        vm_id = str(uuid.uuid4())
        root = SHARE_PATH if on_share else HOST_PATH
        folder = f"{root}\\Virtual Machines\\{vm_id}"
        paths = []
        for index, source in enumerate(disks, start=1):
            base = f"{folder}\\disk{index}.vhdx"
            self.local(base).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, self.local(base))
            size = _virtual_size(source)
            self.vhds[base.lower()] = Vhd(base, 3, 3, size)
            if checkpoint_states is None:
                paths.append(base)
                continue
            leaf = f"{folder}\\disk{index}_{uuid.uuid4()}.avhdx"
            self.local(leaf).write_bytes(b"vhdxfile" + b"differencing disk: read its chain "
                                         b"on the host" + bytes(4096))
            current = self.private_dir / f"{vm_id}-disk{index}-current.vhdx"
            shutil.copyfile(checkpoint_states[index - 1], current)
            self.vhds[leaf.lower()] = Vhd(leaf, 3, 4, size, parent=base, current=current)
            paths.append(leaf)
        vm = VM(id=vm_id, name=name, state=state, cpus=cpus, memory=memory_mb << 20,
                generation=generation, notes=notes, secure_boot=secure_boot, disks=paths,
                macs=list(macs), switch="External", dvd=True,
                checkpoints=[("before-upgrade", None)] if checkpoint_states else [])
        with self.lock:
            self.vms[vm_id] = vm
        return vm

    def vm_object(self, vm: VM) -> dict[str, Any]:
        return {"Name": vm.name, "Id": vm.id, "VMName": vm.name, "VMId": vm.id,
                "State": STATES[vm.state], "ProcessorCount": vm.cpus,
                "MemoryStartup": vm.memory, "Generation": vm.generation,
                "Path": f"{HOST_PATH}\\Virtual Machines", "Notes": vm.notes, "_vm": vm}


def _virtual_size(path: Path) -> int:
    info = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                          capture_output=True, text=True).stdout
    return int(json.loads(info)["virtual-size"])


# ----------------------------------------------------------------- PowerShell, a subset

def tokens(script: str) -> list[tuple[str, str]]:
    """(kind, text): str (a literal, unquoted), op, word."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(script):
        ch = script[i]
        if ch in " \t\r":
            i += 1
        elif ch in QUOTES:
            value = []
            i += 1
            while True:
                if i >= len(script):
                    raise PSError("ParserError: The string is missing the terminator: '.")
                if script[i] in QUOTES:
                    if i + 1 < len(script) and script[i + 1] in QUOTES:
                        value.append(script[i + 1])
                        i += 2
                        continue
                    i += 1
                    break
                value.append(script[i])
                i += 1
            out.append(("str", "".join(value)))
        elif script.startswith("@(", i):
            out.append(("op", "@("))
            i += 2
        elif ch in "|(),;\n=":
            out.append(("op", ch))
            i += 1
        else:
            match = re.match(r"[^\s|(),;=" + QUOTES + "]+", script[i:])
            assert match is not None
            out.append(("word", match.group()))
            i += len(match.group())
    return out


@dataclass
class Call:
    cmdlet: str
    named: dict[str, Any]
    positional: list[Any]


class Interpreter:
    """Runs one script against `host`; output and error text as PowerShell writes them."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.toks: list[tuple[str, str]] = []
        self.pos = 0

    # parsing
    def _peek(self) -> tuple[str, str] | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def _take(self) -> tuple[str, str]:
        tok = self._peek()
        if tok is None:
            raise PSError("ParserError: unexpected end of script")
        self.pos += 1
        return tok

    def _value(self) -> Any:
        """One argument: an element, or several separated by commas (an array)."""
        items = [self._element()]
        while self._peek() == ("op", ","):
            self._take()
            items.append(self._element())
        return items if len(items) > 1 else items[0]

    def _element(self) -> Any:
        kind, text = self._take()
        if kind == "op" and text == "@(":
            inner = self._pipeline()
            if self._take() != ("op", ")"):
                raise PSError("ParserError: missing ')'")
            return ("subexpr", inner)
        if kind == "str":
            return text
        if kind == "word" and re.fullmatch(r"-?\d+", text):
            return int(text)
        if kind == "word" and not text.startswith("-"):
            return text  # a bare word argument
        raise PSError(f"ParserError: unexpected token '{text}'")

    def _command(self) -> Call:
        kind, name = self._take()
        if kind != "word":
            raise PSError(f"ParserError: unexpected token '{name}'")
        call = Call(name, {}, [])
        while (tok := self._peek()) is not None and tok not in (("op", "|"), ("op", ")"),
                                                                  ("op", ";"), ("op", "\n")):
            if tok[0] == "word" and tok[1].startswith("-") and not tok[1][1:].isdigit():
                self._take()
                following = self._peek()
                switch = following is None or following[0] == "op" and following[1] in (
                    "|", ")", ";", "\n") or (following[0] == "word"
                                              and following[1].startswith("-"))
                call.named[tok[1][1:].lower()] = True if switch else self._value()
            else:
                call.positional.append(self._value())
        return call

    def _pipeline(self) -> list[Call]:
        calls = [self._command()]
        while self._peek() == ("op", "|"):
            self._take()
            calls.append(self._command())
        return calls

    def run(self, script: str) -> str:
        self.toks = tokens(script)
        self.pos = 0
        output: list[str] = []
        while self._peek() is not None:
            if self._peek() in (("op", ";"), ("op", "\n")):
                self._take()
                continue
            kind, text = self.toks[self.pos]
            if kind == "word" and self.pos + 1 < len(self.toks) and self.toks[
                    self.pos + 1] == ("op", "="):
                self._assign(text)
                continue
            if text == "$PSVersionTable.PSVersion.Major":
                self._take()
                output.append("5")
                continue
            result = self._execute(self._pipeline(), [])
            output.extend(str(item) for item in result if isinstance(item, str | int))
        return "".join(line + "\r\n" for line in output)

    def _assign(self, name: str) -> None:
        self.pos += 2
        value = self._take()
        known = {"$ErrorActionPreference": ("str", "Stop"),
                 "$ProgressPreference": ("str", "SilentlyContinue"),
                 "[Console]::OutputEncoding": ("word", "[Text.Encoding]::UTF8")}
        if known.get(name) != value:
            raise PSError(f"The assignment {name} = {value[1]} is not one this host expects")

    # executing
    def _execute(self, calls: list[Call], piped: list[Any]) -> list[Any]:
        for call in calls:
            handler = getattr(self, "_" + call.cmdlet.lower().replace("-", "_"), None)
            if handler is None:
                raise PSError(f"The term '{call.cmdlet}' is not recognized as the name of a "
                              "cmdlet, function, script file, or operable program.")
            piped = handler(call, piped)
        return piped

    def _params(self, call: Call, allowed: set[str]) -> dict[str, Any]:
        for name in call.named:
            if name not in allowed:
                raise PSError(f"{call.cmdlet} : A parameter cannot be found that matches "
                              f"parameter name '{name}'.")
        values = dict(call.named)
        for name, value in values.items():
            if isinstance(value, tuple):
                values[name] = self._execute(value[1], [])
        return values

    def _vms_in(self, piped: list[Any]) -> list[VM]:
        return [item["_vm"] for item in piped if isinstance(item, dict) and "_vm" in item]

    def _get_vm(self, call: Call, piped: list[Any]) -> list[Any]:
        params = self._params(call, {"id", "name"})
        vms = list(self.host.vms.values())
        if "id" in params:
            vms = [vm for vm in vms if vm.id.lower() == str(params["id"]).lower()]
            if not vms:
                raise PSError(f"Get-VM : Hyper-V was unable to find a virtual machine with ID "
                              f"\"{params['id']}\".")
        pattern = params.get("name") or (call.positional[0] if call.positional else None)
        if pattern is not None:
            vms = [vm for vm in vms if fnmatch(vm.name.lower(), str(pattern).lower())]
        return [self.host.vm_object(vm) for vm in vms]

    def _where_object(self, call: Call, piped: list[Any]) -> list[Any]:
        params = self._params(call, {"property", "eq", "value"})
        if params.get("eq") is not True or "property" not in params:
            raise PSError("Where-Object : this host knows -Property P -EQ -Value V only")
        wanted = str(params.get("value", "")).lower()
        return [item for item in piped
                if str(item.get(params["property"], "")).lower() == wanted]

    def _select_object(self, call: Call, piped: list[Any]) -> list[Any]:
        params = self._params(call, {"property"})
        names = params["property"] if isinstance(params["property"], list) else [
            params["property"]]
        return [{name: item.get(name) for name in names} for item in piped]

    def _convertto_json(self, call: Call, piped: list[Any]) -> list[Any]:
        params = self._params(call, {"compress", "depth", "inputobject"})
        value = params.get("inputobject", piped)
        return [json.dumps(value, separators=(",", ":") if params.get("compress") else None)]

    def _get_vmfirmware(self, call: Call, piped: list[Any]) -> list[Any]:
        self._params(call, set())
        out = []
        for vm in self._vms_in(piped):
            if vm.generation != 2:
                raise PSError("Get-VMFirmware : Generation 1 virtual machines do not support "
                              "the Get-VMFirmware cmdlet.")
            out.append({"VMName": vm.name, "SecureBoot": 0 if vm.secure_boot else 1,
                        "SecureBootTemplate": "MicrosoftUEFICertificateAuthority"})
        return out

    def _get_vmharddiskdrive(self, call: Call, piped: list[Any]) -> list[Any]:
        self._params(call, set())
        out = []
        for vm in self._vms_in(piped):
            controller = 1 if vm.generation == 2 else 0
            out += [{"VMName": vm.name, "ControllerType": controller, "ControllerNumber": 0,
                     "ControllerLocation": index, "Path": path, "DiskNumber": None}
                    for index, path in enumerate(vm.disks)]
            # a pass-through drive's Path describes the physical disk; Get-VHD knows none
            out += [{"VMName": vm.name, "ControllerType": controller, "ControllerNumber": 0,
                     "ControllerLocation": len(vm.disks) + index, "DiskNumber": number,
                     "Path": f"Disk {number} {size:.2f} GB Bus 0 Lun {number} Target 0"}
                    for index, (number, size) in enumerate(vm.passthrough)]
        return out

    def _get_vhd(self, call: Call, piped: list[Any]) -> list[Any]:
        params = self._params(call, {"path"})
        paths = params["path"] if isinstance(params["path"], list) else [params["path"]]
        out = []
        for path in paths:
            vhd = self.host.vhd(path)
            out.append({"Path": vhd.path, "VhdFormat": vhd.format, "VhdType": vhd.type,
                        "Size": vhd.size, "FileSize": self.host.local(path).stat().st_size,
                        "ParentPath": vhd.parent or ""})
        return out

    def _get_vmnetworkadapter(self, call: Call, piped: list[Any]) -> list[Any]:
        self._params(call, set())
        return [{"Name": "Network Adapter", "MacAddress": mac.replace(":", "").upper(),
                 "SwitchName": vm.switch, "IPAddresses": ["10.0.0.5", "fe80::5"]}
                for vm in self._vms_in(piped) for mac in vm.macs]

    def _get_vmdvddrive(self, call: Call, piped: list[Any]) -> list[Any]:
        self._params(call, set())
        return [{"ControllerNumber": 1, "ControllerLocation": 0, "Path": None}
                for vm in self._vms_in(piped) if vm.dvd]

    def _get_vmsnapshot(self, call: Call, piped: list[Any]) -> list[Any]:
        self._params(call, set())
        return [{"Name": name, "ParentSnapshotName": parent}
                for vm in self._vms_in(piped) for name, parent in vm.checkpoints]

    def _stop_vm(self, call: Call, piped: list[Any]) -> list[Any]:
        self._params(call, {"force", "turnoff"})
        for vm in self._vms_in(piped):
            vm.state = "Off"
            self.host.actions.append(f"Stop-VM {vm.name}")
        return []

    def _start_vm(self, call: Call, piped: list[Any]) -> list[Any]:
        self._params(call, set())
        for vm in self._vms_in(piped):
            vm.state = "Running"
            self.host.actions.append(f"Start-VM {vm.name}")
        return []

    def _remove_vm(self, call: Call, piped: list[Any]) -> list[Any]:
        params = self._params(call, {"name", "force"})
        pattern = str(params.get("name") or (call.positional[0] if call.positional else ""))
        with self.host.lock:
            for vm in [*self._vms_in(piped), *(v for v in self.host.vms.values()
                                               if pattern and fnmatch(v.name, pattern))]:
                self.host.vms.pop(vm.id, None)
                self.host.actions.append(f"Remove-VM {vm.name}")
        return []

    def _export_vm(self, call: Call, piped: list[Any]) -> list[Any]:
        params = self._params(call, {"path"})
        for vm in self._vms_in(piped):
            target = f"{params['path']}\\{vm.name}"
            if self.host.writable("Export-VM", target).exists():
                raise PSError(f"Export-VM : Failed to copy file during export: '{target}' "
                              "already exists.")
            disks_dir = f"{target}\\Virtual Hard Disks"
            self.host.local(disks_dir).mkdir(parents=True)
            (self.host.local(target) / "Virtual Machines").mkdir()
            (self.host.local(target) / "Virtual Machines" / f"{vm.id}.vmcx").write_bytes(
                b"\x00" * 512)
            for path in vm.disks:
                chain = [self.host.vhd(path)]
                while chain[-1].parent:
                    chain.append(self.host.vhd(chain[-1].parent))
                for vhd in chain:
                    copy = f"{disks_dir}\\{vhd.path.rsplit(chr(92), 1)[1]}"
                    shutil.copyfile(self.host.local(vhd.path), self.host.local(copy))
                    parent = (f"{disks_dir}\\{vhd.parent.rsplit(chr(92), 1)[1]}"
                              if vhd.parent else None)
                    self.host.vhds[copy.lower()] = Vhd(copy, vhd.format, vhd.type, vhd.size,
                                                       parent=parent, current=vhd.current)
            time.sleep(self.host.export_seconds)
            self.host.export_gate.wait(timeout=300)
            self.host.actions.append(f"Export-VM {vm.name} {params['path']}")
        return []

    def _convert_vhd(self, call: Call, piped: list[Any]) -> list[Any]:
        params = self._params(call, {"path", "destinationpath", "vhdtype"})
        source = self.host.vhd(params["path"])
        destination = self.host.writable("Convert-VHD", params["destinationpath"])
        if destination.exists():
            raise PSError(f"Convert-VHD : The file '{params['destinationpath']}' exists.")
        state = source.current or self.host.local(source.path)
        shutil.copyfile(state, destination)
        self.host.vhds[params["destinationpath"].lower()] = Vhd(
            params["destinationpath"], 3, 3 if params.get("vhdtype") == "Dynamic" else 2,
            source.size)
        self.host.actions.append(f"Convert-VHD {params['path']}")
        return []

    def _new_vhd(self, call: Call, piped: list[Any]) -> list[Any]:
        params = self._params(call, {"path", "sizebytes", "dynamic", "fixed"})
        target = self.host.writable("New-VHD", params["path"])
        if target.exists():
            raise PSError(f"New-VHD : The file '{params['path']}' already exists.")
        subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", str(target),
                        str(int(params["sizebytes"]))], check=True)
        self.host.vhds[params["path"].lower()] = Vhd(params["path"], 3, 3,
                                                     int(params["sizebytes"]))
        self.host.actions.append(f"New-VHD {params['path']}")
        return []

    def _remove_item(self, call: Call, piped: list[Any]) -> list[Any]:
        params = self._params(call, {"literalpath", "recurse", "force"})
        if str(params["literalpath"]).startswith("\\\\"):
            # a WinRM session's NTLM logon cannot authenticate to a second server (the
            # double hop): a file server's path is refused
            raise PSError(f"Remove-Item : Access to the path '{params['literalpath']}' is "
                          "denied.")
        target = self.host.local(params["literalpath"])
        if not target.exists():
            raise PSError(f"Remove-Item : Cannot find path '{params['literalpath']}' because "
                          "it does not exist.")
        if target.is_dir():
            if not params.get("recurse") and any(target.iterdir()):
                raise PSError("Remove-Item : the folder has children and -Recurse was not given")
            shutil.rmtree(target)
        else:
            target.unlink()
        self.host.actions.append(f"Remove-Item {params['literalpath']}")
        return []


def clixml_error(message: str) -> bytes:
    escaped = (message.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
               + "_x000D__x000A_")
    return ("#< CLIXML\r\n<Objs Version=\"1.1.0.1\" xmlns=\"http://schemas.microsoft.com/"
            f"powershell/2004/04\"><S S=\"Error\">{escaped}</S></Objs>").encode()


# ------------------------------------------------------------------------- WS-Management

@dataclass
class Command:
    done: threading.Event = field(default_factory=threading.Event)
    stdout: bytes = b""
    stderr: bytes = b""
    code: int = 0


@dataclass
class State:
    host: Host
    username: str
    password: str
    cert_hash: bytes
    shells: dict[str, dict[str, Command]] = field(default_factory=dict)
    refused: int = 0  # requests answered 401 after credentials were offered
    lock: threading.Lock = field(default_factory=threading.Lock)


def _envelope(action: str, relates_to: str, body: str) -> bytes:
    return (f'<s:Envelope xmlns:s="{NS["s"]}" xmlns:a="{NS["a"]}" xmlns:w="{NS["w"]}" '
            f'xmlns:rsp="{NS["rsp"]}"><s:Header><a:Action>{action}</a:Action>'
            f"<a:MessageID>uuid:{uuid.uuid4()}</a:MessageID><a:RelatesTo>{relates_to}"
            f"</a:RelatesTo></s:Header><s:Body>{body}</s:Body></s:Envelope>").encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: State

    def setup(self) -> None:
        super().setup()
        self.authenticated = False
        self.ntlm: Any = None

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
               ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if body:
            self.send_header("Content-Type", "application/soap+xml;charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _challenge(self, offered: bool) -> None:
        if offered:
            with self.state.lock:
                self.state.refused += 1
        self._reply(401, headers={"WWW-Authenticate": 'Negotiate, Basic realm="WSMAN"'})

    def _authenticate(self) -> bool:
        """True when the request may go on; otherwise the 401 has been sent."""
        if self.authenticated:
            return True
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "basic":
            given = base64.b64decode(token).decode(errors="replace")
            if given == f"{self.state.username}:{self.state.password}":
                return True
            self._challenge(True)
            return False
        if scheme.lower() not in ("negotiate", "ntlm") or not token:
            self._challenge(False)
            return False
        raw = base64.b64decode(token)
        if raw[8:12] == b"\x01\x00\x00\x00":  # an NTLM negotiate message starts over
            bindings = GssChannelBindings(
                application_data=b"tls-server-end-point:" + self.state.cert_hash)
            self.ntlm = spnego.server(protocol="ntlm", channel_bindings=bindings)
        if self.ntlm is None:
            self._challenge(True)
            return False
        try:
            answer = self.ntlm.step(raw)
        except SpnegoError:
            self.ntlm = None
            self._challenge(True)
            return False
        if self.ntlm.complete:
            self.authenticated = True  # NTLM authenticates the connection
            return True
        self._reply(401, headers={
            "WWW-Authenticate": f"{scheme} {base64.b64encode(answer or b'').decode()}"})
        return False

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/wsman":
            self._reply(404)
            return
        if not self._authenticate():
            return
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            self._reply(400)
            return
        action = root.findtext("s:Header/a:Action", "", NS)
        message_id = root.findtext("s:Header/a:MessageID", "", NS)
        resource = root.findtext("s:Header/w:ResourceURI", "", NS)
        if resource != f"{SHELL_URI}/cmd":
            self._fault(message_id, "w:DestinationUnreachable", f"unknown resource {resource}")
            return
        shell_id = next((node.text or "" for node in root.iter(f"{{{NS['w']}}}Selector")
                         if node.get("Name") == "ShellId"), "")
        kind = action.rsplit("/", 1)[-1]
        if kind == "Create":
            self._create(message_id)
        elif shell_id not in self.state.shells:
            self._fault(message_id, "w:InvalidSelectors", f"no shell {shell_id!r}")
        elif kind == "Command":
            self._command(message_id, shell_id, root)
        elif kind == "Receive":
            self._receive(message_id, shell_id, root)
        elif kind == "Signal":
            self._reply(200, _envelope(f"{SHELL_URI}/SignalResponse", message_id,
                                       "<rsp:SignalResponse/>"))
        elif kind == "Delete":
            self.state.shells.pop(shell_id, None)
            self._reply(200, _envelope("http://schemas.xmlsoap.org/ws/2004/09/transfer/"
                                       "DeleteResponse", message_id, ""))
        else:
            self._fault(message_id, "a:ActionNotSupported", f"unknown action {action}")

    def _fault(self, relates_to: str, code: str, reason: str) -> None:
        body = (f"<s:Fault><s:Code><s:Value>s:Sender</s:Value><s:Subcode><s:Value>{code}"
                f"</s:Value></s:Subcode></s:Code><s:Reason><s:Text xml:lang=\"en-US\">"
                f"{reason}</s:Text></s:Reason></s:Fault>")
        self._reply(400, _envelope("http://schemas.dmtf.org/wbem/wsman/1/wsman/fault",
                                   relates_to, body))

    def _create(self, message_id: str) -> None:
        shell_id = str(uuid.uuid4()).upper()
        self.state.shells[shell_id] = {}
        body = (f'<x:ResourceCreated xmlns:x="http://schemas.xmlsoap.org/ws/2004/09/transfer">'
                f"<a:Address>https://127.0.0.1/wsman</a:Address><a:ReferenceParameters>"
                f"<w:ResourceURI>{SHELL_URI}/cmd</w:ResourceURI><w:SelectorSet>"
                f'<w:Selector Name="ShellId">{shell_id}</w:Selector></w:SelectorSet>'
                f"</a:ReferenceParameters></x:ResourceCreated>"
                f"<rsp:Shell><rsp:ShellId>{shell_id}</rsp:ShellId></rsp:Shell>")
        self._reply(200, _envelope("http://schemas.xmlsoap.org/ws/2004/09/transfer/"
                                   "CreateResponse", message_id, body))

    def _command(self, message_id: str, shell_id: str, root: ET.Element) -> None:
        line = root.findtext("s:Body/rsp:CommandLine/rsp:Command", "", NS)
        match = re.fullmatch(r"powershell(?:\.exe)?((?:\s+-\w+)*)\s+-(?:EncodedCommand|enc"
                             r"odedcommand|e|ec)\s+([A-Za-z0-9+/=]+)", line.strip(),
                             re.IGNORECASE)
        command = Command()
        if len(line) > CMD_LIMIT:
            command.stderr = b"The command line is too long."
            command.code = 1
            command.done.set()
        elif match is None:
            command.stderr = f"'{line[:40]}' is not a command this host runs".encode()
            command.code = 1
            command.done.set()
        else:
            script = base64.b64decode(match.group(2)).decode("utf-16-le")
            self.state.host.scripts.append(script)
            threading.Thread(target=self._run, args=(command, script), daemon=True).start()
        command_id = str(uuid.uuid4()).upper()
        self.state.shells[shell_id][command_id] = command
        self._reply(200, _envelope(f"{SHELL_URI}/CommandResponse", message_id,
                                   f"<rsp:CommandResponse><rsp:CommandId>{command_id}"
                                   "</rsp:CommandId></rsp:CommandResponse>"))

    def _run(self, command: Command, script: str) -> None:
        try:
            command.stdout = Interpreter(self.state.host).run(script).encode()
        except PSError as exc:
            command.stderr = clixml_error(str(exc))
            command.code = 1
        except Exception as exc:  # noqa: BLE001 - the stand-in's own bug, shown as an error
            command.stderr = clixml_error(f"stand-in failure: {type(exc).__name__}: {exc}")
            command.code = 1
        command.done.set()

    def _receive(self, message_id: str, shell_id: str, root: ET.Element) -> None:
        stream = root.find("s:Body/rsp:Receive/rsp:DesiredStream", NS)
        command_id = stream.get("CommandId", "") if stream is not None else ""
        command = self.state.shells[shell_id].get(command_id)
        if command is None:
            self._fault(message_id, "w:InvalidSelectors", f"no command {command_id!r}")
            return
        done = command.done.wait(1.0)
        parts = []
        if done:
            for name, data in (("stdout", command.stdout), ("stderr", command.stderr)):
                if data:
                    parts.append(f'<rsp:Stream Name="{name}" CommandId="{command_id}">'
                                 f"{base64.b64encode(data).decode()}</rsp:Stream>")
            parts.append(f'<rsp:CommandState CommandId="{command_id}" State="{SHELL_URI}/'
                         f'CommandState/Done"><rsp:ExitCode>{command.code}</rsp:ExitCode>'
                         "</rsp:CommandState>")
        else:
            parts.append(f'<rsp:CommandState CommandId="{command_id}" State="{SHELL_URI}/'
                         'CommandState/Running"/>')
        self._reply(200, _envelope(f"{SHELL_URI}/ReceiveResponse", message_id,
                                   f"<rsp:ReceiveResponse>{''.join(parts)}"
                                   "</rsp:ReceiveResponse>"))


@dataclass
class StandIn:
    state: State
    server: ThreadingHTTPServer

    @property
    def host(self) -> Host:
        return self.state.host

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_standin(host: Host, *, cert: Path, key: Path, port: int, username: str,
                  password: str, users_file: Path) -> StandIn:
    """The stand-in on 127.0.0.1:`port` (HTTPS). NTLM checks `username`/`password` through
    the credential file pyspnego's acceptor reads (NTLM_USER_FILE)."""
    users_file.write_text(f":{username}:{password}\n")
    os.environ["NTLM_USER_FILE"] = str(users_file)
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    state = State(host=host, username=username, password=password,
                  cert_hash=hashlib.sha256(der).digest())
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True, name="winrm-standin").start()
    return StandIn(state, server)
