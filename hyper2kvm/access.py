"""Whether qemu, run by libvirt as its own user, can reach a disk.

On qemu:///system libvirt starts qemu as an unprivileged user (Debian: `libvirt-qemu`)
and hands it each disk file when the VM starts, but not the folders above the file: a
disk under a folder that user cannot pass through is defined without complaint, then
fails to start with "Cannot access storage file ... Permission denied". This finds that
folder before the domain is defined, so the error can name it and the fix."""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
from pathlib import Path

from core.errors import RegistrationError

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
DEFAULT_USER = "libvirt-qemu"  # Debian's build of libvirt
_USER_LINE = re.compile(r'^\s*user\s*=\s*"([^"]+)"', re.MULTILINE)


def qemu_user(uri: str) -> tuple[str, int, set[int]] | None:
    """The user qemu runs as for `uri` (name, uid, groups), or None when it runs as root
    or as the caller (qemu:///session, other drivers) or cannot be known."""
    if not uri.startswith("qemu:///system"):
        return None
    try:
        configured = _USER_LINE.search(QEMU_CONF.read_text())
    except OSError:
        configured = None
    name = configured.group(1) if configured else DEFAULT_USER
    try:
        entry = pwd.getpwnam(name.lstrip("+"))
    except KeyError:
        return None
    if entry.pw_uid == 0:
        return None
    groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem}
    return entry.pw_name, entry.pw_uid, groups


def _passes(folder: Path, uid: int, groups: set[int]) -> bool:
    info = folder.stat()
    try:  # an access ACL may let the user through whatever the mode bits say
        if os.getxattr(folder, "system.posix_acl_access"):
            return True
    except OSError:
        pass
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid in groups:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def blocking_folder(path: Path, uid: int, groups: set[int]) -> Path | None:
    """The first folder on the way to `path` that the user cannot pass through."""
    real = Path(os.path.realpath(path))
    for folder in reversed(real.parents):
        if not _passes(folder, uid, groups):
            return folder
    return None


def check_qemu_reaches(uri: str, disks: list[Path]) -> None:
    """RegistrationError naming the folder and the fix when qemu could not open a disk."""
    user = qemu_user(uri)
    if user is None:
        return
    name, uid, groups = user
    for disk in disks:
        folder = blocking_folder(disk, uid, groups)
        if folder is not None:
            mode = stat.S_IMODE(folder.stat().st_mode)
            raise RegistrationError(
                f"qemu runs as {name!r} and cannot pass through {folder} (mode {mode:04o}) "
                f"to reach {disk}: let it through with 'setfacl -m u:{name}:x {folder}' "
                f"(or 'chmod o+x {folder}'), or put hyper2kvm.output_dir elsewhere")
