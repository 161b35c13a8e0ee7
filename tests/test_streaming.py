"""The one-pass path against the vCenter simulator: disks go straight from the datastore
(flat extents through nbdkit's curl plugin, stream-optimized files inflated in order) or
an NFC lease into the converted images, through the provider and through hypervisord."""

from __future__ import annotations

import os
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.errors import VerificationError
from core.models import ExportOptions, VMInfo
from hyper2kvm import qemu_img
from hyper2kvm.output import OutputImage
from hyper2kvm.vmdk_stream import inflate_stream
from providers import get_provider
from tests.peers import Daemon, unique, wait_for_job, wait_until
from tests.test_jobs import submit
from tests.test_vsphere import CuttingProxy, settings_for
from tests.vsphere_sim import (
    Vcsim,
    VcsimProxy,
    create_vm,
    give_disk_content,
    put_file,
    vm_disk_paths,
)

MIB = 1 << 20


def half_random(folder: Path, name: str, size_mib: int) -> Path:
    """A raw disk: random data in its first half, zeros (a hole) in the second."""
    path = folder / f"{name}.raw"
    with path.open("wb") as stream:
        for _ in range(size_mib // 2):
            stream.write(os.urandom(MIB))
        stream.truncate(size_mib * MIB)
    return path


def stream_into(provider: Any, identifier: str, folder: Path,
                options: ExportOptions) -> tuple[VMInfo | None, list[Path], list[int]]:
    """provider.stream into qcow2 outputs under `folder`, finished and committed."""
    outputs: dict[int, OutputImage] = {}
    moved: list[int] = []

    def open_output(index: int, size: int) -> OutputImage:
        output = OutputImage(folder / f"disk{index}.qcow2", output_format="qcow2", size=size)
        outputs[index] = output
        return output.open()

    try:
        vm = provider.stream(identifier, open_output, options=options, progress=moved.append)
        for output in outputs.values():
            output.finish()
        for output in outputs.values():
            output.commit()
    finally:
        for output in outputs.values():
            if not output.target.exists():
                output.discard()
    return vm, [outputs[i].target for i in sorted(outputs)], moved


def nbd_helpers() -> list[str]:
    """The one-pass path's qemu-nbd, nbdkit and qemu-img processes still running."""
    found = subprocess.run(["pgrep", "-a", "-f", "^(qemu-nbd|nbdkit|qemu-img) "],
                           capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "hypersdk-" in line]


# ---- through the provider -----------------------------------------------------------------


def test_flat_and_stream_optimized_disks_stream_from_the_datastore(
        vcsim: Vcsim, si: Any, tmp_path: Path) -> None:
    images = [half_random(tmp_path, "flat", 24), half_random(tmp_path, "stream", 16)]
    name = unique("t-one")
    vm = create_vm(si, name, disks_mib=[24, 16])
    give_disk_content(vcsim, vm, images, layout=["flat", "stream"])
    out = tmp_path / "out"
    out.mkdir()
    provider = get_provider("vsphere", settings_for(vcsim.host))
    info, disks, moved = stream_into(provider, vm._moId, out,
                                     ExportOptions(transport="datastore"))
    assert info is not None and info.name == name
    for disk, image in zip(disks, images, strict=True):
        assert qemu_img.compare(image, disk), f"{disk.name} differs from the VM's disk"
        # the zero half was never written: the image holds the random half and metadata
        assert qemu_img.info(disk)["actual-size"] < 0.6 * image.stat().st_size
    assert sum(moved) == (24 + 16) * MIB
    assert sorted(p.name for p in out.iterdir()) == ["disk0.qcow2", "disk1.qcow2"]
    assert not nbd_helpers()


def test_nfc_disks_are_inflated_on_the_way(vcsim: Vcsim, si: Any, tmp_path: Path) -> None:
    images = [half_random(tmp_path, "a", 16), half_random(tmp_path, "b", 8)]
    name = unique("t-one-nfc")
    vm = create_vm(si, name, disks_mib=[16, 8])
    give_disk_content(vcsim, vm, images, layout="stream")
    provider = get_provider("vsphere", settings_for(vcsim.host))
    info, disks, moved = stream_into(provider, vm._moId, tmp_path, ExportOptions(transport="nfc"))
    assert info is not None
    for disk, image in zip(disks, images, strict=True):
        assert qemu_img.compare(image, disk)
    assert sum(moved) == 24 * MIB
    assert vcsim.log.read_text().count("transferred") >= 2  # through the lease's data path


def test_a_layout_that_cannot_stream_is_left_to_the_two_pass_path(
        vcsim: Vcsim, si: Any, tmp_path: Path) -> None:
    image = half_random(tmp_path, "sparse", 8)
    sparse = tmp_path / f"{unique('t-one-sparse')}.vmdk"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "vmdk", "-o",
                    "subformat=monolithicSparse", str(image), str(sparse)], check=True)
    name = unique("t-one-sparse")
    vm = create_vm(si, name, disks_mib=[8])
    put_file(vcsim, vm_disk_paths(vm)[0], sparse)
    provider = get_provider("vsphere", settings_for(vcsim.host))
    out = tmp_path / "out"
    out.mkdir()
    info, disks, _ = stream_into(provider, vm._moId, out, ExportOptions(transport="datastore"))
    assert info is None and disks == [] and not any(out.iterdir())


@pytest.mark.parametrize(("layout", "transport"), [("flat", "datastore"), ("stream", "nfc")])
def test_a_connection_cut_mid_disk_resumes(vcsim: Vcsim, si: Any, tmp_path: Path,
                                           layout: str, transport: str) -> None:
    image = half_random(tmp_path, "cut", 32)
    name = unique(f"t-one-cut-{layout}")
    vm = create_vm(si, name, disks_mib=[32])
    give_disk_content(vcsim, vm, [image], layout=layout)
    proxy = CuttingProxy(vcsim.host, cut_after=6 * MIB)  # mid-disk, in the random half
    proxy.start()
    try:
        provider = get_provider("vsphere", settings_for(proxy.address))
        info, [disk], moved = stream_into(provider, vm._moId, tmp_path,
                                          ExportOptions(transport=transport))
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert info is not None and qemu_img.compare(image, disk)
    assert sum(moved) == 32 * MIB  # a restarted stream reports no byte twice


def test_a_hostile_stream_is_refused(tmp_path: Path) -> None:
    image = half_random(tmp_path, "h", 2)
    stream = tmp_path / "h.vmdk"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "vmdk", "-o",
                    "subformat=streamOptimized", str(image), str(stream)], check=True)
    raw = bytearray(stream.read_bytes())
    overhead = struct.unpack_from("<Q", raw, 0x38 + 8)[0]  # after the grain directory offset
    first = overhead * 512
    writes: list[tuple[int, int]] = []

    def run(data: bytes) -> None:
        view = memoryview(data)
        position = 0

        def read(count: int) -> bytes:
            nonlocal position
            chunk = bytes(view[position:position + count])
            position += len(chunk)
            return chunk

        inflate_stream(read, lambda offset, d: writes.append((offset, len(d))))

    run(bytes(raw))  # as written: fine
    assert writes and all(offset + length <= 2 * MIB for offset, length in writes)
    past_end = bytearray(raw)
    struct.pack_into("<Q", past_end, first, 1 << 40)  # the first grain's LBA: past the disk
    with pytest.raises(VerificationError, match="past the disk"):
        run(bytes(past_end))
    bomb = bytearray(raw)
    payload = zlib.compress(bytes(10 * MIB))  # inflates to far more than a grain
    struct.pack_into("<QI", bomb, first, 0, len(payload))
    bomb[first + 12:first + 12 + len(payload)] = payload
    with pytest.raises(VerificationError):
        run(bytes(bomb))
    with pytest.raises(VerificationError, match="ended inside"):
        run(bytes(raw[:first + 3000]))


# ---- through hypervisord ------------------------------------------------------------------


def _export_folder_bytes(daemon: Daemon) -> int:
    return sum(p.stat().st_size for p in daemon.exports.rglob("*") if p.is_file())


def test_migration_streams_with_no_copy_in_the_export_folder(
        api: httpx.Client, daemon: Daemon, vcsim: Vcsim, vcsim_proxy: VcsimProxy, si: Any,
        tmp_path: Path) -> None:
    images = [half_random(tmp_path, "boot", 64), half_random(tmp_path, "data", 32)]
    name = unique("t-one-job")
    vm = create_vm(si, name, disks_mib=[64, 32], cpus=2, memory_mb=256)
    give_disk_content(vcsim, vm, images, layout=["flat", "stream"])
    before = _export_folder_bytes(daemon)
    vcsim_proxy.throttle.rate = 24 * MIB  # 4 s of streaming: the folder is watched meanwhile
    samples: list[tuple[str, int]] = []
    try:
        job_id = submit(api, vm_identifier=vm._moId, provider="vsphere",
                        options={"transport": "datastore"},
                        hyper2kvm_integration={"replace_existing": True,
                                               "verify_boot": "off"})

        def watched() -> bool:
            progress = api.get(f"/jobs/progress/{job_id}").json()
            samples.append((progress.get("phase") or "", _export_folder_bytes(daemon)))
            return progress["status"] in ("completed", "failed", "cancelled")

        wait_until(watched, timeout=240, interval=0.1, what="the job's end")
    finally:
        vcsim_proxy.throttle.rate = 0
    info = wait_for_job(api, job_id)
    assert info["status"] == "completed", info["error"]
    streaming = [size for phase, size in samples if phase == "stream"]
    assert len(streaming) >= 5, f"the stream phase was seen {len(streaming)} times"
    assert max(size for _, size in samples) == before  # no copy of a disk, at any point
    result = info["result"]
    assert result["export"]["streamed"] is True and result["export"]["files"] == []
    assert "stream" in result["step_seconds"] and "convert" not in result["step_seconds"]
    disks = [Path(d["path"]) for d in result["disks"]]
    for disk, image in zip(disks, images, strict=True):
        assert qemu_img.compare(image, disk), f"{disk.name} differs from the VM's disk"
    assert result["domain_name"] == name


def test_keep_export_writes_the_export_then_converts(
        api: httpx.Client, daemon: Daemon, vcsim: Vcsim, si: Any, tmp_path: Path) -> None:
    image = half_random(tmp_path, "kept", 8)
    name = unique("t-one-keep")
    vm = create_vm(si, name, disks_mib=[8])
    give_disk_content(vcsim, vm, [image], layout="flat")
    job_id = submit(api, vm_identifier=vm._moId, provider="vsphere", export_method="ovf",
                    options={"transport": "datastore", "keep_export": True},
                    hyper2kvm_integration={"replace_existing": True, "verify_boot": "off"})
    info = wait_for_job(api, job_id, timeout=240)
    assert info["status"] == "completed", info["error"]
    result = info["result"]
    assert result["export"]["streamed"] is False
    kept = {Path(f["path"]).suffix for f in result["export"]["files"]}
    assert {".ovf", ".mf", ".vmdk"} <= kept
    assert all(Path(f["path"]).exists() for f in result["export"]["files"])
    assert qemu_img.compare(image, Path(result["disks"][0]["path"]))


def test_cancel_mid_stream_stops_it_and_leaves_nothing(
        api: httpx.Client, daemon: Daemon, vcsim: Vcsim, vcsim_proxy: VcsimProxy, si: Any,
        tmp_path: Path) -> None:
    image = half_random(tmp_path, "cancel", 96)
    name = unique("t-one-cancel")
    vm = create_vm(si, name, disks_mib=[96])
    give_disk_content(vcsim, vm, [image], layout="flat")
    vcsim_proxy.throttle.rate = 4 * MIB  # 12 s for the random half
    try:
        job_id = submit(api, vm_identifier=vm._moId, provider="vsphere",
                        options={"transport": "datastore"},
                        hyper2kvm_integration={"replace_existing": True})

        def streaming() -> bool:
            progress = api.get(f"/jobs/progress/{job_id}").json()
            return progress.get("phase") == "stream" and progress.get("bytes_done", 0) > 0

        wait_until(streaming, timeout=120, interval=0.1, what="bytes to stream")
        output = daemon.images / name
        assert list(output.glob(f".{name}-disk1.qcow2.partial")), "no partial output"
        assert nbd_helpers(), "no qemu-nbd, nbdkit or qemu-img while streaming"
        assert api.post("/jobs/cancel", json={"job_id": job_id}).status_code == 200
        assert wait_for_job(api, job_id, timeout=120)["status"] == "cancelled"
    finally:
        vcsim_proxy.throttle.rate = 0
    wait_until(lambda: not nbd_helpers(), timeout=30, what="the stream's processes to end")
    wait_until(lambda: not [p for p in output.rglob("*") if p.is_file()], timeout=30,
               what="the partial outputs to be removed")
    assert not [p for p in daemon.exports.rglob(f"*{name}*") if p.is_file()]
