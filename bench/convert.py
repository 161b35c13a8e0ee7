"""hyper2kvm convert against bare qemu-img.

Builds a 4 GiB streamOptimized VMDK (half random data, half zeros), then alternates,
--rounds times: `hyper2kvm convert` to qcow2, and bare `qemu-img convert -O qcow2` with
qemu-img's defaults; also times bare qemu-img with each flag hyper2kvm could choose (-W,
-m 16, the source read through io_uring, and both) to show which won. Each run starts from
a dropped page cache (as root), so each reads its source cold.
Prints medians and the ratio hyper2kvm / qemu-img (target <= 1.0).
Run: .venv/bin/python bench/convert.py [--rounds 3] [--size-mib 4096]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from hyper2kvm import qemu_img  # noqa: E402
from hyper2kvm.sample import make_disk  # noqa: E402

BIN = Path(sys.executable).parent


def settle() -> None:
    """Every run starts alike: dirty pages written back and, where we may (root), the page
    cache dropped, so that no variant reads a source another one just warmed."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(command: list[str], output: Path) -> float:
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    settle()
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=4096)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir="/var/tmp"))
    try:
        raw = work / "disk.raw"
        print(f"building a {args.size_mib} MiB disk, half random ...", flush=True)
        make_disk(raw, size_mib=args.size_mib, random_mib=args.size_mib // 2)
        vmdk = work / "bench.vmdk"
        qemu_img.convert(qemu_img.DiskSource(raw, "raw"), vmdk, output_format="vmdk",
                         subformat="streamOptimized")
        raw.unlink()
        out = work / "out.qcow2"
        uring = qemu_img.DiskSource(vmdk, "vmdk", aio="io_uring").spec()

        def bare(*flags: str, source: str = str(vmdk)) -> tuple[list[str], Path]:
            return ["qemu-img", "convert", *flags, "-O", "qcow2", source, str(out)], out

        variants = {
            "hyper2kvm": ([str(BIN / "hyper2kvm"), "convert", str(vmdk), "--output-dir",
                           str(work / "h2k"), "--format", "qcow2", "--json"], work / "h2k"),
            "qemu-img": bare(),
            "qemu-img -W": bare("-W"),
            "qemu-img -m 16": bare("-m", "16"),
            "qemu-img io_uring": bare(source=uring),
            "qemu-img io_uring -m 16": bare("-m", "16", source=uring),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for round_ in range(args.rounds):
            # a different variant goes first each round: no one pays for position
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                command, output = variants[name]
                times[name].append(timed(command, output))
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {t[-1]:.2f}s"
                                                      for n, t in times.items()), flush=True)
        medians = {name: statistics.median(values) for name, values in times.items()}
        print()
        for name, value in medians.items():
            print(f"{name:>23}: median {value:.2f} s")
        ratio = medians["hyper2kvm"] / medians["qemu-img"]
        print(f"ratio hyper2kvm / qemu-img defaults: {ratio:.2f}   target <= 1.0")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
