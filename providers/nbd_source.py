"""A file that a server hands out in HTTP ranges, seen as a disk: an NBD export served by
nbdkit's curl plugin (what virt-v2v uses for HTTPS sources), for the one-pass path to
copy straight into the output image (hyper2kvm.output).

* Every request is a ranged GET; nbdkit's retry filter reopens the connection and asks
  again for the request that failed (a cut connection costs that request, not the disk).
* A cookie (a session's credential) reaches nbdkit through a pipe, never its command
  line, which every local user can read in /proc.
* The socket lives in a private 0700 folder; nbdkit dies with us.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.errors import AuthFailed, NotFound, ProviderError, Transient
from core.process import die_with_parent
from hyper2kvm.output import private_socket_dir, stop_process, wait_for_socket

NBDKIT = os.environ.get("NBDKIT", "nbdkit")


@dataclass(frozen=True)
class HttpsTls:
    """How nbdkit checks the server: against a CA file, the system CAs, or not at all
    (the caller checked the server another way, or was told not to)."""

    verify: bool = True
    ca_file: Path | None = None


@dataclass(frozen=True)
class NbdSource:
    uri: str
    log: Path  # nbdkit's error output

    def error(self, what: str, failure: Exception) -> ProviderError:
        """`failure` of a copy from this source, as the provider error nbdkit's own
        last complaint (an HTTP status, a TLS refusal) says it is."""
        complaint = ""
        with contextlib.suppress(OSError):
            lines = [line for line in self.log.read_text(errors="replace").splitlines()
                     if line.strip()]
            complaint = lines[-1] if lines else ""
        message = f"{what}: {failure}" + (f" ({complaint})" if complaint else "")
        status = _HTTP_ERROR.search(complaint)
        if status and status.group(1) in ("401", "403"):
            return AuthFailed(message)
        if status and status.group(1) == "404":
            return NotFound(message)
        return Transient(message)


_HTTP_ERROR = re.compile(r"returned error: (\d{3})")


@contextlib.contextmanager
def ranged_https_disk(url: str, *, cookie: str | None = None, tls: HttpsTls = HttpsTls(),
                      retries: int = 5, timeout: int = 60) -> Iterator[NbdSource]:
    """Serve `url` (which must answer HEAD with its length and GET with Range) as a
    read-only NBD export. nbdkit stops when the block ends."""
    folder = private_socket_dir("hypersdk-src-")
    socket = folder / "src.sock"
    log = folder / "nbdkit.log"
    read_end = write_end = -1
    args = [NBDKIT, "--foreground", "--readonly", "--exit-with-parent", "--unix", str(socket),
            "--filter=retry", "curl", f"url={url}", f"timeout={timeout}",
            f"retries={retries}", "retry-delay=1"]
    if not tls.verify:
        args.append("sslverify=false")
    elif tls.ca_file:
        args.append(f"cainfo={tls.ca_file}")
    pass_fds: tuple[int, ...] = ()
    if cookie:
        read_end, write_end = os.pipe()
        args.append(f"cookie=-{read_end}")
        pass_fds = (read_end,)
    server: subprocess.Popen[bytes] | None = None
    try:
        with log.open("wb") as errors:
            server = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=errors,
                                      pass_fds=pass_fds, preexec_fn=die_with_parent)
        if cookie:
            os.close(read_end)
            read_end = -1
            os.write(write_end, cookie.encode() + b"\n")
            os.close(write_end)
            write_end = -1
        try:
            wait_for_socket(socket, server, f"nbdkit for {url.split('?')[0]}", log=log)
        except Exception as exc:
            raise ProviderError(str(exc)) from None
        yield NbdSource(uri=f"nbd+unix:///?socket={socket}", log=log)
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        if server is not None:
            stop_process(server, timeout=10)
        shutil.rmtree(folder, ignore_errors=True)
