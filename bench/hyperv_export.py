"""A VHDX read from Samba through the Hyper-V provider's reader against the best plain
copy of the same file.

Starts smbd as the tests do (tests/hyperv_sim.py), puts a dynamic VHDX of --gib GiB of
random data in its share, then alternates, --rounds times: Samba's own `smbclient -c get`
(one stream, pipelined reads), smbprotocol's plain sequential read into a file, and the
provider's reader (providers.hyperv.share.Share.read_file: parallel ranged reads, one SMB
connection per reader, signed, into a sparse file, SHA-256 of the whole file, fsync).
Prints the medians, the throughputs, and the ratio to the faster plain copy (target >=
0.8). Run: .venv/bin/python bench/hyperv_export.py [--rounds 3] [--gib 2]
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

import smbclient  # noqa: E402

from core.config import Config, HyperVProviderConfig  # noqa: E402
from providers.hyperv.share import Connections, Share  # noqa: E402
from providers.ranged import Reading  # noqa: E402
from tests.hyperv_sim import SHARE, SMB_PASSWORD, SMB_USER, start_samba  # noqa: E402

MIB = 1 << 20
NAME = "bench.vhdx"


def smbclient_get(port: int, target: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["smbclient", "-p", str(port), "-U", f"{SMB_USER}%{SMB_PASSWORD}",
                    f"//127.0.0.1/{SHARE}", "-c", f"get {NAME} {target}"], check=True,
                   capture_output=True)
    return time.perf_counter() - start


def smbprotocol_read(port: int, target: Path) -> float:
    start = time.perf_counter()
    with smbclient.open_file(f"\\\\127.0.0.1\\{SHARE}\\{NAME}", mode="rb", buffering=0,
                             port=port, username=SMB_USER, password=SMB_PASSWORD,
                             connection_cache={}) as source, target.open("wb") as out:
        while chunk := source.read(8 * MIB):
            out.write(chunk)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gib", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-hyperv-", dir="/var/tmp"))
    share_dir = work / "share"
    share_dir.mkdir()
    samba, port = start_samba(work / "samba", share_dir)
    try:
        raw = work / "disk.raw"
        with raw.open("wb") as out:
            block = os.urandom(64 * MIB)
            for _ in range((args.gib << 30) // len(block)):
                out.write(block[:-1] + os.urandom(1))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o",
                        "subformat=dynamic", str(raw), str(share_dir / NAME)], check=True)
        raw.unlink()
        size = (share_dir / NAME).stat().st_size
        settings = Config()
        config = HyperVProviderConfig(
            host="127.0.0.1", username="unused", password="unused",  # type: ignore[arg-type]
            export_share=f"smb://127.0.0.1:{port}/{SHARE}", share_username=SMB_USER,
            share_password=SMB_PASSWORD)  # type: ignore[arg-type]
        share = Share.from_config(config, Connections())
        print(f"dynamic VHDX of {size / MIB:.0f} MiB on Samba; provider: parts of "
              f"{settings.export.chunk_size // MIB} MiB, {settings.export.part_concurrency} "
              "parallel reads")
        get, plain, ours = [], [], []
        for round_ in range(args.rounds):
            get.append(smbclient_get(port, work / "get.vhdx"))
            (work / "get.vhdx").unlink()
            plain.append(smbprotocol_read(port, work / "plain.vhdx"))
            (work / "plain.vhdx").unlink()
            reading = Reading.from_settings(work, settings.export, None)
            start = time.perf_counter()
            share.read_file(NAME, work / "ours.vhdx", reading)
            ours.append(time.perf_counter() - start)
            (work / "ours.vhdx").unlink()
            print(f"round {round_ + 1}: smbclient get {get[-1]:.2f} s, smbprotocol "
                  f"{plain[-1]:.2f} s, provider {ours[-1]:.2f} s")
        medians = {"smbclient get": statistics.median(get),
                   "smbprotocol sequential": statistics.median(plain),
                   "provider reader": statistics.median(ours)}
        for label, seconds in medians.items():
            print(f"{label + ':':24s}{seconds:6.2f} s, {size / MIB / seconds:5.0f} MiB/s")
        best = min(medians["smbclient get"], medians["smbprotocol sequential"])
        print(f"ratio provider/best plain copy: {best / medians['provider reader']:.2f} "
              "(target >= 0.8)")
    finally:
        samba.terminate()
        samba.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
