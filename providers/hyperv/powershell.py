"""PowerShell on the Hyper-V host over WinRM (pywinrm): one command per call, its output
`ConvertTo-Json` parsed here. Scripts are built from a command and its parameters, every
value a quoted PowerShell literal: a VM named `x'; Remove-VM *` is a name, never code."""

from __future__ import annotations

import base64
import json
import logging
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import requests
import winrm
from winrm.exceptions import InvalidCredentialsError, WinRMError, WinRMTransportError

from core.config import HyperVProviderConfig
from core.errors import AuthFailed, HypersdkError, InvalidRequest, ProviderError, Transient
from providers.clients import ClientCache

log = logging.getLogger(__name__)

# PowerShell closes a single-quoted string at any of these; doubled, each is itself
_QUOTES = "'\u2018\u2019\u201a\u201b"
# errors stop the script (exit code 1), no progress records on stderr, UTF-8 out
PREAMBLE = ("$ErrorActionPreference = 'Stop'; $ProgressPreference = 'SilentlyContinue'; "
            "[Console]::OutputEncoding = [Text.Encoding]::UTF8\n")
Value = str | int | bool | list[str] | None


def literal(value: str) -> str:
    """`value` as a single-quoted PowerShell string literal, which expands nothing."""
    if "\x00" in value:
        raise InvalidRequest(f"{value!r}: a NUL character cannot be passed to PowerShell")
    return "'" + "".join(ch * 2 if ch in _QUOTES else ch for ch in value) + "'"


@dataclass(frozen=True)
class Command:
    """One cmdlet and its parameters: strings as literals, lists as arrays of literals,
    True as a switch, ints as numbers; None and False left out."""

    cmdlet: str
    parameters: dict[str, Value] = field(default_factory=dict)

    def render(self) -> str:
        words = [self.cmdlet]
        for name, value in self.parameters.items():
            if value is None or value is False:
                continue
            if value is True:
                words.append(f"-{name}")
            elif isinstance(value, int):
                words.append(f"-{name} {value}")
            elif isinstance(value, list):
                words.append(f"-{name} " + ",".join(literal(v) for v in value))
            else:
                words.append(f"-{name} {literal(value)}")
        return " ".join(words)


def pipeline(*commands: Command) -> str:
    return " | ".join(command.render() for command in commands)


def vm_by_id(vm_id: str) -> Command:
    return Command("Get-VM", {"Id": vm_id})


def as_json(*commands: Command, select: list[str]) -> str:
    """The script whose output is the pipeline's objects, `select`ed, as one JSON array."""
    chosen = Command("Select-Object", {"Property": select}).render()
    return (f"ConvertTo-Json -Compress -Depth 4 -InputObject "
            f"@({pipeline(*commands)} | {chosen})")


def _error_text(stderr: bytes) -> str:
    """The error's message: PowerShell writes error records to a redirected stderr as
    CLIXML, one `<S S="Error">` line each."""
    text = stderr.decode("utf-8", "replace")
    if text.startswith("#< CLIXML"):
        try:
            root = ET.fromstring(text.partition("\n")[2])
            text = "".join(node.text or "" for node in root.iter()
                           if node.tag.endswith("S") and node.get("S") == "Error")
            text = text.replace("_x000D__x000A_", "\n")
        except ET.ParseError:
            pass
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # PowerShell's error records end with "+ CategoryInfo ..." lines: the message is first
    message = [line for line in lines if not line.startswith(("+ ", "At line:"))]
    return " ".join(message)[:500] or "no error text"


CONNECTIONS = 4  # WinRM calls at once per host: a long Export-VM holds one, not the host
CMD_LIMIT = 8191  # cmd.exe's longest command line: WinRM's cmd shell runs ours through it


def command_line(script: str) -> str:
    """The PowerShell command line that runs `script`."""
    return "powershell -NoProfile -NonInteractive -EncodedCommand " + _encode(
        PREAMBLE + script)


def fits(script: str) -> bool:
    """Whether `script` fits on one command line (its UTF-16 base64 is 8/3 its length)."""
    return len(command_line(script)) <= CMD_LIMIT


class Host:
    """The WinRM endpoint of one Hyper-V host: up to CONNECTIONS pywinrm Protocols, each
    keeping its authenticated HTTP connection, one call at a time on each; one shell per
    call."""

    def __init__(self, config: HyperVProviderConfig) -> None:
        self.config = config
        name, _, port = config.host.partition(":")
        scheme = "https" if config.tls else "http"
        self.endpoint = f"{scheme}://{name}:{port or (5986 if config.tls else 5985)}/wsman"
        self._idle: list[winrm.Protocol] = []
        self._guard = threading.Lock()
        self._slots = threading.BoundedSemaphore(CONNECTIONS)

    def _new_protocol(self) -> winrm.Protocol:
        config = self.config
        return winrm.Protocol(
            self.endpoint, transport=config.transport, username=config.username,
            password=config.password.get_secret_value(),
            server_cert_validation="validate" if config.cert_validation else "ignore",
            # None: certifi's CAs only, never a bundle named by the environment
            ca_trust_path=str(config.ca_file) if config.ca_file else None,  # type: ignore[arg-type]
            read_timeout_sec=70, operation_timeout_sec=60)

    @contextmanager
    def _connection(self) -> Iterator[winrm.Protocol]:
        """A protocol no other call is using, made when none is idle."""
        with self._slots:
            with self._guard:
                protocol = self._idle.pop() if self._idle else None
            protocol = protocol or self._new_protocol()
            try:
                yield protocol
            finally:
                with self._guard:
                    self._idle.append(protocol)

    @contextmanager
    def _shell(self, protocol: winrm.Protocol, what: str) -> Iterator[str]:
        shell = self._call(protocol.open_shell, what)
        try:
            yield shell
        finally:
            try:
                # the HTTP session stays: NTLM authenticated its connection once
                protocol.close_shell(shell, close_session=False)
            except Exception as exc:  # noqa: BLE001 - the host reaps idle shells itself
                log.debug("closing shell %s: %s", shell, exc)

    def _call(self, fn: Any, what: str, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            raise map_error(exc, what) from None

    def run(self, script: str, what: str) -> str:
        """Run `script` in a new PowerShell on the host; its standard output, or the
        ProviderError its error says."""
        command = command_line(script)
        if len(command) > CMD_LIMIT:
            raise ProviderError(f"{what}: the script is {len(command)} characters encoded, "
                                f"over cmd.exe's {CMD_LIMIT}")
        with self._connection() as protocol, self._shell(protocol, what) as shell:
            command_id = self._call(protocol.run_command, what, shell, command)
            out, err, code = self._call(protocol.get_command_output, what, shell,
                                        command_id)
            try:
                protocol.cleanup_command(shell, command_id)
            except Exception as exc:  # noqa: BLE001 - the output is in hand
                log.debug("cleanup of %s: %s", command_id, exc)
        if code != 0:
            raise ProviderError(f"{what}: {_error_text(err)}")
        return str(out.decode("utf-8", "replace"))

    def objects(self, script: str, what: str) -> list[dict[str, Any]]:
        """`script`'s JSON output (an `as_json` script) as a list of objects."""
        out = self.run(script, what).strip()
        if not out:
            return []
        try:
            parsed = json.loads(out)
        except json.JSONDecodeError:
            raise ProviderError(f"{what}: the host answered something that is not JSON: "
                                f"{out[:200]!r}") from None
        items = parsed if isinstance(parsed, list) else [parsed]
        return [item for item in items if isinstance(item, dict)]


def _encode(script: str) -> str:
    return base64.b64encode(script.encode("utf-16-le")).decode("ascii")


def map_error(exc: BaseException, what: str) -> HypersdkError:
    if isinstance(exc, HypersdkError):
        return exc
    if isinstance(exc, InvalidCredentialsError):
        return AuthFailed(f"{what}: the Hyper-V host refused the credentials")
    if isinstance(exc, requests.exceptions.SSLError):
        return ProviderError(f"{what}: the WinRM endpoint's TLS certificate was refused "
                             f"({type(exc.args[0] if exc.args else exc).__name__}); set "
                             "providers.hyperv.ca_file to its CA")
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return Transient(f"{what}: the WinRM endpoint is unreachable ({type(exc).__name__})")
    if isinstance(exc, WinRMTransportError):
        if exc.code in (500, 502, 503, 504):
            return Transient(f"{what}: WinRM answered HTTP {exc.code}")
        return ProviderError(f"{what}: WinRM answered HTTP {exc.code}")
    if isinstance(exc, WinRMError):
        return ProviderError(f"{what}: {exc}")
    return ProviderError(f"{what}: {type(exc).__name__}: {exc}")


_HOSTS: ClientCache[HyperVProviderConfig, Host] = ClientCache(Host)


def host_for(config: HyperVProviderConfig) -> Host:
    return _HOSTS.get(config)
