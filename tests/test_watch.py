"""The hyper2kvm watch-directory daemon as a real process: manifests dropped into a real
folder, conversions run as convert-vm flow runs on the session's Prefect server."""

from __future__ import annotations

import json
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyper2kvm import ova, qemu_img
from hyper2kvm.manifest import digest_file
from hyper2kvm.sample import make_sample_ova
from hyper2kvm.watch import write_json_atomically
from tests.helpers import make_random_raw, make_truncated_ova, source_disk_as_raw
from tests.peers import start_watch_daemon, unique, wait_until


@pytest.fixture
def watch(prefect_server: str, tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    watch_dir, output, log = tmp_path / "watch", tmp_path / "out", tmp_path / "daemon.log"
    watch_dir.mkdir()
    yield watch_dir, output, log


def drop(watch_dir: Path, job_id: str, **fields: object) -> None:
    """A manifest; the samples are data disks, not guests: no guest conversion or boot
    check (tests/test_guest.py has those)."""
    write_json_atomically(watch_dir / f"{job_id}.json", {
        "job_id": job_id, "convert_guest": False, "verify_boot": "off", **fields})


def outcome(watch_dir: Path, job_id: str, timeout: float = 120) -> dict:
    def found() -> dict | None:
        for folder in ("done", "failed"):
            path = watch_dir / folder / f"{job_id}.result.json"
            if path.exists():
                return json.loads(path.read_text())
        return None

    return wait_until(found, timeout=timeout, interval=0.2, what=f"result of {job_id}")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def test_jobs_convert_and_bad_ones_fail_with_a_reason(watch, tmp_path: Path) -> None:
    watch_dir, output, log = watch
    good = make_sample_ova(tmp_path / "in", "good-vm", size_mib=24)
    truncated = make_truncated_ova(tmp_path / "in", "cut-vm")
    tampered = make_sample_ova(tmp_path / "in", "tampered-vm", size_mib=16)
    with tampered.open("r+b") as stream:  # flip a byte inside the VMDK: checksum mismatch
        member = ova.read_members(tampered)["tampered-vm-disk1.vmdk"]
        stream.seek(member.offset + member.size - 600)
        byte = stream.read(1)
        stream.seek(-1, 1)
        stream.write(bytes([byte[0] ^ 0xFF]))
    escaping = tmp_path / "in" / "escape.ova"
    with tarfile.open(escaping, "w", format=tarfile.USTAR_FORMAT) as archive:
        archive.add(good, arcname="escape.ovf")
        info = tarfile.TarInfo("../evil.vmdk")
        info.size = 0
        archive.addfile(info)
    (watch_dir / ".half-written.json.tmp").write_text('{"job_id": "never"')

    daemon = start_watch_daemon(watch_dir, output, log, "--workers", "3", source_root=tmp_path)
    try:
        drop(watch_dir, "good", source_path=str(good))
        drop(watch_dir, "cut", source_path=str(truncated))
        drop(watch_dir, "tampered", source_path=str(tampered))
        drop(watch_dir, "escape", source_path=str(escaping))
        drop(watch_dir, "missing", source_path=str(tmp_path / "nope.ova"))
        (watch_dir / "garbage.json").write_text("{not json")

        result = outcome(watch_dir, "good")
        assert result["status"] == "completed"
        disk = Path(result["result"]["disks"][0]["path"])
        assert disk == output / "good-vm" / "good-vm-disk1.qcow2"
        assert qemu_img.compare(source_disk_as_raw(good, tmp_path / "good.raw"), disk)
        assert result["result"]["disks"][0]["sha256"] == digest_file(disk)
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        with get_client(sync_client=True) as client:  # the job was a convert-vm flow run
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=["convert good"])))
        assert [run.state.type.value for run in runs] == ["COMPLETED"]
        assert (watch_dir / "done" / "good.json").exists()

        reasons = {job: outcome(watch_dir, job)["error"]
                   for job in ("cut", "tampered", "escape", "missing", "garbage")}
        assert "qemu-img" in reasons["cut"]
        assert "does not match the manifest" in reasons["tampered"]
        assert "escapes the archive" in reasons["escape"]
        assert "not a file" in reasons["missing"]
        assert "bad manifest" in reasons["garbage"] or "json" in reasons["garbage"].lower()
        for job in ("cut", "tampered", "escape", "missing", "garbage"):
            assert (watch_dir / "failed" / f"{job}.json").exists()
        for name in ("cut-vm", "tampered-vm"):  # nothing half-written where output goes
            assert not (output / name).exists() or not any((output / name).iterdir())
        assert (watch_dir / ".half-written.json.tmp").exists()
        assert not list((watch_dir / "processing").iterdir())
    finally:
        stop(daemon)


def test_a_job_cut_short_by_kill_runs_again_after_restart_and_only_it(
    watch, tmp_path: Path
) -> None:
    watch_dir, output, log = watch
    small = make_sample_ova(tmp_path / "in", "small-vm", size_mib=16)
    name = unique()
    big = make_random_raw(tmp_path / "in", name, 768)
    daemon = start_watch_daemon(watch_dir, output, log, source_root=tmp_path)
    drop(watch_dir, "first", source_path=str(small))
    first = outcome(watch_dir, "first")
    assert first["status"] == "completed"
    first_result = watch_dir / "done" / "first.result.json"
    first_mtime = first_result.stat().st_mtime_ns

    drop(watch_dir, "big", source_path=str(big),
         conversion_options={"compression": True})
    wait_until(lambda: list((output / name).glob(".*.partial")) if (output / name).exists()
               else [], timeout=120, interval=0.01, what="the conversion to be under way")
    daemon.kill()  # no chance to clean up: as a power cut would
    daemon.wait()
    assert (watch_dir / "processing" / "big.json").exists()

    daemon = start_watch_daemon(watch_dir, output, log, source_root=tmp_path)
    try:
        result = outcome(watch_dir, "big", timeout=300)
        assert result["status"] == "completed", result
        disk = output / name / f"{name}-disk1.qcow2"
        assert qemu_img.compare(big, disk)
        assert not list((output / name).glob(".*"))  # no partial left
        assert first_result.stat().st_mtime_ns == first_mtime  # not repeated
        assert sorted(p.name for p in (watch_dir / "done").iterdir()) == [
            "big.json", "big.result.json", "first.json", "first.result.json"]
        assert "resuming 1 interrupted job" in log.read_text()
    finally:
        stop(daemon)


def test_transient_failures_are_retried_and_others_are_not(tmp_path: Path) -> None:
    """The retry policy alone, with a conversion that fails on cue."""
    import threading

    from core.errors import ConversionError, Transient
    from hyper2kvm.watch import WatchDaemon

    calls: dict[str, int] = {}

    def convert(job):  # type: ignore[no-untyped-def]
        calls[job.job_id] = calls.get(job.job_id, 0) + 1
        if job.job_id == "flaky" and calls["flaky"] == 1:
            raise Transient("connection reset")
        if job.job_id == "broken":
            raise ConversionError("qemu-img said no")
        return {"ok": True}

    daemon = WatchDaemon(tmp_path, convert, poll=0.05, retry_delay=0.01)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        drop(tmp_path, "flaky", source_path="/x.ova")
        drop(tmp_path, "broken", source_path="/y.ova")
        assert outcome(tmp_path, "flaky", timeout=10)["attempts"] == 2
        failed = outcome(tmp_path, "broken", timeout=10)
        assert failed["attempts"] == 1 and failed["error"] == "qemu-img said no"
        assert calls == {"flaky": 2, "broken": 1}
    finally:
        daemon.stop()
        runner.join(10)
