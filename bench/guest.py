"""A VMware-style guest made to boot on KVM: hypersdk's converter against virt-v2v alone.

The guest is scripts/build-guest.sh's Debian 12 (no virtio drivers in its initramfs), as
an OVA with a streamOptimized VMDK. Then, --rounds times, alternately:
  * hypersdk: the OVA read in place and converted by qemu-img to qcow2, guest conversion
    with virt-v2v-in-place on the copy, the libvirt domain defined, and the boot check
    (a throwaway overlay booted until the login prompt shows);
  * virt-v2v -i ova <ova> -o local -of qcow2: converts the guest too, checks no boot.
Both use the same libguestfs accelerator (KVM where a kernel runs under it on this host,
else TCG). Prints each time, the medians, and the ratio hypersdk / virt-v2v (target
<= 0.8 while also doing the boot check).
Run: .venv/bin/python bench/guest.py [--rounds 1]
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

from core.models import ExportResult  # noqa: E402
from hyper2kvm.boot import verify_boot  # noqa: E402
from hyper2kvm.convert import convert_staged  # noqa: E402
from hyper2kvm.cpu import domain_type_and_cpu  # noqa: E402
from hyper2kvm.domain import DomainDisk, NetworkMap, domain_xml  # noqa: E402
from hyper2kvm.guest import accelerator, convert_guest  # noqa: E402
from hyper2kvm.registration import define_domain, undefine_domain  # noqa: E402
from hyper2kvm.sample import build_guest_disk, make_sample_ova  # noqa: E402
from hyper2kvm.staging import describe_source, stage_export  # noqa: E402

URI = "qemu:///system"


def hypersdk(ova: Path, work: Path) -> tuple[float, str]:
    started = time.monotonic()
    export: ExportResult = describe_source(ova)
    staged = stage_export(export, [ova.parent])
    folder = work / "hypersdk"
    disks = convert_staged(staged, folder, output_format="qcow2")
    report = convert_guest(staged.vm, disks, uri=URI, log_file=work / "v2v-in-place.log",
                           timeout=7200)
    domain_type, cpu = domain_type_and_cpu("auto", URI)
    name = f"bench-guest-{os.getpid()}"
    xml = domain_xml(staged.vm, [DomainDisk(d.path, d.format) for d in disks], name=name,
                     domain_type=domain_type, cpu=cpu, networks=NetworkMap(default="user"),
                     compat=not report.virtio)
    define_domain(URI, xml, name=name, autostart=False, replace=True)
    try:
        outcome = verify_boot(URI, name, timeout=1200)
    finally:
        undefine_domain(URI, name)
    elapsed = time.monotonic() - started
    shutil.rmtree(folder)
    return elapsed, (f"guest {report.seconds:.0f} s ({report.accelerator}), boot "
                     f"{'ok' if outcome.booted else 'FAILED'} in {outcome.seconds:.0f} s")


def virt_v2v(ova: Path, work: Path) -> tuple[float, str]:
    output = work / "virt-v2v"
    output.mkdir()
    mode, _cpu = accelerator(URI)
    env = {**os.environ, "LIBGUESTFS_BACKEND": "direct"}
    if mode == "tcg":
        env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    started = time.monotonic()
    done = subprocess.run(["virt-v2v", "-i", "ova", str(ova), "-o", "local", "-os",
                           str(output), "-of", "qcow2"], env=env, capture_output=True,
                          text=True)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"virt-v2v failed: {done.stderr[-2000:]}")
    shutil.rmtree(output)
    return elapsed, f"({mode})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    guest_disk = build_guest_disk()
    with tempfile.TemporaryDirectory(prefix="bench-guest-", dir="/var/tmp") as scratch:
        work = Path(scratch)
        work.chmod(0o755)  # qemu (libvirt-qemu) reads the disks in here
        ova = make_sample_ova(work, "bench-guest", guest_disk=guest_disk, cpus=1,
                              memory_mb=1024)
        print(f"guest: {guest_disk} as {ova.name} ({ova.stat().st_size / 2**20:.0f} MiB)")
        ours: list[float] = []
        theirs: list[float] = []
        for round_number in range(1, args.rounds + 1):
            seconds, note = hypersdk(ova, work)
            ours.append(seconds)
            print(f"round {round_number}: hypersdk (convert + guest + boot check) "
                  f"{seconds:7.1f} s  {note}", flush=True)
            seconds, note = virt_v2v(ova, work)
            theirs.append(seconds)
            print(f"round {round_number}: virt-v2v -i ova -o local -of qcow2     "
                  f"{seconds:7.1f} s  {note}", flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"median hypersdk {a:.1f} s, virt-v2v {b:.1f} s, ratio {a / b:.2f} "
          "(target <= 0.8)")


if __name__ == "__main__":
    main()
