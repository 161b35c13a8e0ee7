"""Watching a running domain's serial console through libvirt (local or remote URIs)."""

from __future__ import annotations

import contextlib
import re
import threading
import time

import libvirt

# CSI sequences (with private parameters such as OVMF's `ESC [=3h`), charset selection,
# and the single-character ones (reset, save/restore cursor, keypad modes)
_ANSI = re.compile(r"\x1b(\[[0-9;?=<>]*[A-Za-z]|[()][A-Za-z0-9]|[cM78=>])")
_REOPEN_PAUSE = 0.5


class ConsoleWatch:
    """Reads the domain's console in a thread; `wait_for` finds a pattern in what it
    printed. Keeps the last `keep` lines. A console stream that ends while the domain
    still runs is opened again (counted in `reopened`), so that a dropped stream never
    looks like a silent guest. Stop the domain before `close()`."""

    def __init__(self, uri: str, name: str, *, keep: int = 40) -> None:
        # a connection of its own: a blocking recv() holds its connection, and a call on
        # the same one (destroying the domain, say) would wait for the guest to print
        self._conn = libvirt.open(uri)
        self._name = name
        try:
            self._stream = self._open()
        except libvirt.libvirtError:
            self._conn.close()
            raise
        self._raw = ""
        self._text = ""
        self._keep = keep
        self._changed = threading.Condition()
        self._closed = False
        self._closing = False
        self.reopened = 0
        self.last_output = time.monotonic()
        self._reader = threading.Thread(target=self._read, name="console", daemon=True)
        self._reader.start()

    def _open(self) -> libvirt.virStream:
        stream = self._conn.newStream(0)
        self._conn.lookupByName(self._name).openConsole(None, stream,
                                                        libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        return stream

    def _read(self) -> None:
        while True:
            try:
                data = self._stream.recv(4096)
            except libvirt.libvirtError:
                data = b""
            if not isinstance(data, bytes) or not data:
                # -2 (would block) cannot happen on a blocking stream; 0: EOF
                if self._closing or not self._reopen():
                    break
                continue
            with self._changed:
                # escape sequences may be split between reads: clean the whole tail
                self._raw = (self._raw + data.decode(errors="replace"))[-65536:]
                self._text = _ANSI.sub("", self._raw).replace("\r", "")
                self.last_output = time.monotonic()
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _reopen(self) -> bool:
        """The stream ended: open the console again while the domain still runs."""
        time.sleep(_REOPEN_PAUSE)
        try:
            if self._closing or not self._conn.lookupByName(self._name).isActive():
                return False
            with contextlib.suppress(libvirt.libvirtError):
                self._stream.abort()
            self._stream = self._open()
        except libvirt.libvirtError:
            return False
        self.reopened += 1
        return True

    def send(self, text: str) -> bool:
        """Type `text` on the console (a getty prints its prompt again on Enter); False
        if the stream would not take it."""
        try:
            return bool(self._stream.send(text.encode()) > 0)
        except libvirt.libvirtError:
            return False

    def wait_for(self, patterns: dict[str, re.Pattern[str]], timeout: float) -> str | None:
        """The name of the first pattern found in the console's output within `timeout`
        seconds, or None."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for name, pattern in patterns.items():
                    if pattern.search(self._text):
                        return name
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return None
                self._changed.wait(min(remaining, 1.0))

    def match(self, pattern: re.Pattern[str]) -> str | None:
        with self._changed:
            found = pattern.search(self._text)
        return found.group(0) if found else None

    def last_lines(self) -> list[str]:
        with self._changed:
            lines = [line for line in self._text.split("\n") if line.strip()]
        return lines[-self._keep:]

    def close(self, *, timeout: float = 5.0) -> None:
        """Call once the domain is stopped (that ends the stream): waits for the reader,
        then lets the stream go. Aborting a stream whose reader still waits inside recv()
        would block both."""
        self._closing = True
        self._reader.join(timeout)
        if not self._reader.is_alive():
            with contextlib.suppress(libvirt.libvirtError):
                self._stream.abort()
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
