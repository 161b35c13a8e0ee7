"""The demo: a real migration on the embedded default, end to end.

Builds (once per machine, scripts/build-guest.sh) a small Debian guest as VMware leaves
one — no virtio drivers in its initramfs, /dev/sda1 in fstab, open-vm-tools — and puts
it as an OVA in the local inbox; starts hypervisord (which starts its own Prefect
server); migrates the VM through the REST API while showing progress: export, convert,
guest conversion (virt-v2v-in-place), libvirt registration, and a boot check that
watches the VM come up to its login prompt; prints what was found and changed, and the
Prefect UI address."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

ROOT = Path(__file__).resolve().parent.parent
console = Console()


def write_config(data: Path, *, api_port: int, ui_port: int, api_key: str) -> Path:
    config = data / "config.yaml"
    config.write_text(f"""\
daemon:
  address: "127.0.0.1:{api_port}"
  log_level: "info"
  workers: 2
  api_key: "${{HYPERSDK_DEMO_KEY}}"
  prefect_ui_port: {ui_port}
providers:
  local:
    path: "{data / 'inbox'}"
hyper2kvm:
  output_dir: "{data / 'images'}"
  watch_dir: "{data / 'watch'}"
  default_format: qcow2
  libvirt_uri: "qemu:///system"
  network: user        # no libvirt network needed on a fresh machine
export:
  base_path: "{data / 'exports'}"
  concurrent_exports: 2
database:
  path: "{data / 'hypersdk.db'}"
""")
    os.environ["HYPERSDK_DEMO_KEY"] = api_key
    return config


def wait_healthy(client: httpx.Client, daemon: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            sys.exit(f"hypervisord exited ({daemon.returncode}); see {log}")
        try:
            if client.get("/health").json().get("status") == "healthy":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    sys.exit(f"hypervisord did not become healthy; see {log}")


def follow(client: httpx.Client, job_id: str) -> dict:
    columns = (TextColumn("[bold]{task.fields[phase]:<9}"), BarColumn(),
               TextColumn("{task.percentage:>5.1f}%"), TextColumn("{task.fields[moved]}"),
               TextColumn("ETA {task.fields[eta]}"))  # `moved`: bytes, or the step
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("migrate", total=100, phase="pending", moved="", eta="-")
        while True:
            progress = client.get(f"/jobs/progress/{job_id}").json()
            moved = (f"{progress['bytes_done'] / 2**20:,.1f}/{progress['bytes_total'] / 2**20:,.1f}"
                     f" MiB" if progress["bytes_total"] else (progress.get("step") or "")[:48])
            eta = progress["eta_seconds"]
            bar.update(task, completed=progress["percentage"], phase=progress["phase"],
                       moved=moved, eta="-" if eta is None else f"{eta:.0f}s")
            if progress["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.5)
    return client.get("/jobs/query", params={"job_id": job_id}).json()


def explain_failure(info: dict, images: Path, job_id: str) -> None:
    """The job's error on one line, the guest's console as the boot check last saw it,
    and what to do."""
    first, _, rest = (info.get("error") or "no error recorded").partition("\n")
    console.print(f"[red]job {info['status']}: {first}")
    for line in rest.splitlines():
        console.print(f"  {line}", markup=False, highlight=False)
    if "boot check failed" in first:
        console.print(f"what to do: the console's last lines above show where the guest "
                      f"stopped; its disks are kept in {images}; the job's whole log: "
                      f"hyperctl jobs logs {job_id}; once fixed, hyperctl jobs retry "
                      f"{job_id} (finished steps are not redone)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "var" / "demo")
    parser.add_argument("--api-port", type=int, default=8080)
    parser.add_argument("--ui-port", type=int, default=4200)
    parser.add_argument("--keep-running", action=argparse.BooleanOptionalAction,
                        default=sys.stdin.isatty(),
                        help="leave hypervisord and the Prefect UI up until Ctrl-C")
    args = parser.parse_args()
    data: Path = args.data.resolve()
    (data / "inbox").mkdir(parents=True, exist_ok=True)
    api_key = secrets.token_urlsafe(24)
    config = write_config(data, api_port=args.api_port, ui_port=args.ui_port, api_key=api_key)

    from hyper2kvm import registration
    from hyper2kvm.sample import build_guest_disk, make_sample_ova

    name = "debian-vm"
    sample = data / "inbox" / f"{name}.ova"
    if not sample.exists():
        console.print("building the sample guest (Debian 12 as VMware leaves it; once per "
                      "machine, a few minutes)")
        make_sample_ova(data / "inbox", name, guest_disk=build_guest_disk(), cpus=1,
                        memory_mb=1024)
        console.print(f"sample VM {sample} (a streamOptimized VMDK in an OVA)")
    replace = registration.domain_exists("qemu:///system", name)

    log = data / "hypervisord.log"
    console.print(f"starting hypervisord --config {config}  (log: {log})")
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # the embedded default: hypervisord starts Prefect
    daemon = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "hypervisord"), "--config", str(config)],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
    headers = {"Authorization": f"Bearer {api_key}"}
    base = f"http://127.0.0.1:{args.api_port}"
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            wait_healthy(client, daemon, log)
            vms = client.post("/vms/list", json={"provider": "local"}).json()
            console.print(f"local inbox holds {vms['count']} VM(s): "
                          f"{', '.join(vm['name'] for vm in vms['vms'])}")
            job = client.post("/jobs/submit", json={
                "vm_identifier": name, "provider": "local", "export_method": "ova",
                "hyper2kvm_integration": {"enabled": True, "auto_convert": True,
                                          "daemon_mode": False, "replace_existing": replace,
                                          "verify_boot": "require"},
            })
            job.raise_for_status()
            job_id = job.json()["job_id"]
            console.print(f"job {job_id} submitted; watch it at "
                          f"http://127.0.0.1:{args.ui_port}/runs/flow-run/{job_id}")
            info = follow(client, job_id)
            if info["status"] != "completed":
                explain_failure(info, data / "images" / name, job_id)
                return 1
            result = info["result"] or {}
            guest, boot = result.get("guest") or {}, result.get("boot") or {}
            console.print(f"[green]completed[/]: libvirt domain [bold]{result['domain_name']}[/] "
                          f"({result['domain_uuid']}) on {result['libvirt_uri']}, disk "
                          f"{result['disks'][0]['path']}")
            if guest:
                console.print(f"guest: {guest['distribution']} {guest['version']} "
                              f"({guest['arch']}, {guest['firmware']}), kernels "
                              f"{', '.join(guest['kernels'])}; converted in {guest['seconds']} s "
                              f"({guest['accelerator']})")
                for change in guest["changes"]:
                    console.print(f"  changed: {change}")
            if boot:
                console.print(f"[green]booted[/] in {boot['seconds']} s: {boot['reason']}")
                for line in boot["console"][-3:]:
                    console.print(f"  console: {line}")
            console.print(subprocess.run(["virsh", "-c", "qemu:///system", "dominfo",
                                          result["domain_name"]], capture_output=True,
                                         text=True).stdout.strip())
            console.print(f"Prefect UI: http://127.0.0.1:{args.ui_port}/runs/flow-run/{job_id}"
                          f" (it asks for the line in {data / 'prefect' / 'auth_string'})")
            if args.keep_running:
                console.print("hypervisord keeps running; press Ctrl-C to stop")
                daemon.wait()
            return 0 if boot.get("verified") else 1
    except KeyboardInterrupt:
        return 0
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)


def run() -> int:
    """main(), with anything that goes wrong said in one line, not a traceback."""
    from core.errors import HypersdkError

    try:
        return main()
    except (HypersdkError, httpx.HTTPError, OSError, subprocess.SubprocessError) as exc:
        console.print(f"[red]demo failed: {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(run())
