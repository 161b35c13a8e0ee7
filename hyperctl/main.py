"""The `hyperctl` command: VMs, migrations and jobs (here), schedules, backup policies and
webhooks (hyperctl.resources). Tables for people, `--json` for scripts; exit codes 0 done,
1 job failed, 2 usage error, 3 job cancelled, 4 daemon unreachable or refused."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from hyperctl.client import CtlError, Daemon, resolve_target
from hyperctl.follow import follow

EXIT_FAILED, EXIT_CANCELLED = 1, 3

app = typer.Typer(name="hyperctl", no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Drive hypervisord from a terminal or a script (its REST API).")
vms_app = typer.Typer(no_args_is_help=True, help="VMs as the providers see them.")
jobs_app = typer.Typer(no_args_is_help=True, help="Jobs: list, show, logs, cancel, retry.")
app.add_typer(vms_app, name="vms")
app.add_typer(jobs_app, name="jobs")


@dataclass
class Context:
    daemon: Daemon
    as_json: bool
    out: Console
    err: Console

    def emit(self, data: Any, table: Callable[[Any], Table | str]) -> None:
        """`data` as JSON (--json) or as what `table` makes of it."""
        if self.as_json:
            self.out.print_json(json.dumps(data, default=str))
        else:
            self.out.print(table(data))


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    made = Table(title=title, title_justify="left")
    for column in columns:
        made.add_column(column)
    for row in rows:
        made.add_row(*("" if cell is None else str(cell) for cell in row))
    return made


def ctx_of(ctx: typer.Context) -> Context:
    found: Context = ctx.obj
    return found


@app.callback()
def main_options(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(help="hypervisord's URL (env HYPERSDK_URL; "
                                                 "default http://127.0.0.1:8080)")] = None,
    api_key: Annotated[str | None, typer.Option(help="the API key (env HYPERSDK_API_KEY)",
                                                show_default=False)] = None,
    config: Annotated[Path | None, typer.Option(
        help="a YAML file with url and api_key (env HYPERSDK_CTL_CONFIG; default "
             "~/.config/hypersdk/hyperctl.yaml)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output, for scripts")] = False,
) -> None:
    target = resolve_target(url=url, api_key=api_key, config=config)
    daemon = Daemon(target)
    ctx.call_on_close(daemon.close)
    ctx.obj = Context(daemon=daemon, as_json=as_json, out=Console(),
                      err=Console(stderr=True))


# -- VMs -------------------------------------------------------------------------------

ProviderOpt = Annotated[str, typer.Option("--provider", "-p", help="local, vsphere, aws, "
                                          "azure, gcp, oci, hyperv")]


@vms_app.command("list")
def vms_list(
    ctx: typer.Context, provider: ProviderOpt = "local",
    name_pattern: Annotated[str | None, typer.Option(help="shell glob, e.g. web-*")] = None,
    datacenter: str | None = None, folder: str | None = None,
    status: Annotated[str | None, typer.Option(help="poweredOn, poweredOff, suspended")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="every tag given must match")] = None,
) -> None:
    """VMs of one provider matching the filters."""
    c = ctx_of(ctx)
    wanted = {"name_pattern": name_pattern, "datacenter": datacenter, "folder": folder,
              "status": status, "tags": tag or []}
    found = c.daemon.post("/vms/list", {"provider": provider, "filter": {
        k: v for k, v in wanted.items() if v not in (None, [])}})
    c.emit(found, lambda d: table(
        f"{d['count']} VM(s) on {d['provider']}",
        ["name", "identifier", "power", "datacenter", "folder", "tags"],
        [(v["name"], v["identifier"], v["power_state"], v.get("datacenter"), v.get("folder"),
          ",".join(v.get("tags") or [])) for v in d["vms"]]))


@vms_app.command("info")
def vms_info(ctx: typer.Context, vm: str, provider: ProviderOpt = "local") -> None:
    """One VM's hardware."""
    c = ctx_of(ctx)
    info = c.daemon.get("/vms/info", identifier=vm, provider=provider)
    c.emit(info, lambda d: table(
        d["name"], ["cpus", "memory", "firmware", "guest", "disks", "nics"],
        [(d.get("cpus"), f"{d.get('memory_mb')} MiB", d.get("firmware"), d.get("guest_os"),
          ", ".join(f"{x.get('capacity_bytes', 0) // 2**20} MiB" for x in d.get("disks", [])),
          len(d.get("nics", [])))]))


# -- migrate and jobs ------------------------------------------------------------------


def finish_followed(c: Context, info: dict[str, Any]) -> None:
    """The followed job's end, said, and as the exit code."""
    if c.as_json:
        c.out.print_json(json.dumps(info, default=str))
    elif info["status"] == "completed":
        result = info.get("result") or {}
        domain = result.get("domain_name")
        c.out.print(f"completed: domain {domain} on {result.get('libvirt_uri')}" if domain
                    else "completed")
    else:
        c.err.print(f"{info['status']}: {one_line(info.get('error') or '')}", highlight=False)
    if info["status"] == "failed":
        raise typer.Exit(EXIT_FAILED)
    if info["status"] == "cancelled":
        raise typer.Exit(EXIT_CANCELLED)


def one_line(text: str) -> str:
    return " ".join(text.split())


@app.command()
def migrate(
    ctx: typer.Context, vm: str, provider: ProviderOpt = "local",
    output_format: Annotated[str | None, typer.Option(
        "--format", help="qcow2 or raw [default: the daemon's hyper2kvm.default_format]")] = None,
    export_method: Annotated[str, typer.Option(help="ova, ovf or vmdk")] = "ova",
    export_path: Annotated[str | None, typer.Option(help="under export.base_path")] = None,
    autostart: bool = False,
    replace: Annotated[bool, typer.Option(help="replace a domain or disks of that name")] = False,
    keep_export: Annotated[bool, typer.Option(help="keep the exported files too")] = False,
    warm: Annotated[bool, typer.Option(help="copy while the VM runs; cut over later "
                                            "(hyperctl jobs cutover)")] = False,
    precopy_interval: Annotated[int | None, typer.Option(
        help="seconds between a warm job's sync rounds [default: 600]")] = None,
    cutover_at: Annotated[str | None, typer.Option(
        help="a warm job's cutover time (ISO 8601, e.g. 2026-12-24T02:00:00Z)")] = None,
    follow_job: Annotated[bool, typer.Option("--follow", "-f", help="show a live bar until "
                                             "the job ends; exit with its outcome")] = False,
    dry_run: Annotated[bool, typer.Option(help="change nothing: show what the job would do "
                                               "and what stops it (exit 1 if anything)")] = False,
) -> None:
    """Submit a migration of VM (the seed's job definition); --follow to watch it."""
    c = ctx_of(ctx)
    integration: dict[str, Any] = {"autostart": autostart, "replace_existing": replace}
    if output_format:
        integration["format"] = output_format
    job = {"vm_identifier": vm, "provider": provider, "export_method": export_method,
           "export_path": export_path, "options": {k: v for k, v in {
               "keep_export": keep_export, "warm": warm or None,
               "precopy_interval": precopy_interval, "cutover_at": cutover_at}.items()
               if v is not None},
           "hyper2kvm_integration": integration, "dry_run": dry_run or None}
    submitted = c.daemon.post("/jobs/submit", {k: v for k, v in job.items() if v is not None})
    if dry_run:
        c.emit(submitted, describe_dry_run)
        if submitted["blockers"]:
            raise typer.Exit(EXIT_FAILED)
        return
    if not follow_job:
        c.emit(submitted, lambda d: f"job {d['job_id']} {d['status']}")
        return
    if not c.as_json:
        c.err.print(f"job {submitted['job_id']}", highlight=False)
    finish_followed(c, follow(c.daemon, submitted["job_id"], c.err, show=not c.as_json))


def describe_dry_run(d: dict[str, Any]) -> Table:
    vm = d["vm"]
    estimate = d.get("estimated_seconds")
    rows: list[tuple[str, Any]] = [
        ("vm", f"{vm['name']}: {vm['cpus']} vCPU, {vm['memory_mb']} MiB, {vm['firmware']}"),
        ("domain", d.get("domain_name") or "(not converted)"),
        ("disks", f"{len(vm['disks'])}, {d['disk_bytes'] / 2**30:.2f} GiB"),
        ("estimate", f"{estimate:.0f} s" if estimate is not None else "unknown")]
    if d.get("output_dir"):
        rows.append(("room", f"{d['output_free_bytes'] / 2**30:.2f} GiB free in "
                             f"{d['output_dir']}"))
    rows += [(f"blocker {b['code']}", b["message"]) for b in d["blockers"]]
    rows += [("warning", warning) for warning in d["warnings"]]
    return table("dry run: " + ("blocked" if d["blockers"] else "nothing in the way"),
                 ["", ""], rows)


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="pending, running, waiting, completed, "
                                                    "failed, cancelled")] = None,
    limit: int = 50,
) -> None:
    """Jobs, newest first."""
    c = ctx_of(ctx)
    found = c.daemon.get("/jobs/query", status=status, limit=limit)
    c.emit(found, lambda d: table(
        f"{len(d['jobs'])} of {d['total']} job(s)",
        ["job", "status", "vm", "provider", "created", "finished"],
        [(j["job_id"], j["status"], j.get("vm_identifier"), j.get("provider"),
          (j.get("created_at") or "")[:19], (j.get("finished_at") or "")[:19])
         for j in d["jobs"]]))


@jobs_app.command("show")
def jobs_show(ctx: typer.Context, job_id: str) -> None:
    """One job: status, progress, error or result."""
    c = ctx_of(ctx)
    info = c.daemon.get("/jobs/query", job_id=job_id)
    if info["status"] in ("pending", "running", "waiting"):
        info["progress"] = c.daemon.get(f"/jobs/progress/{job_id}")

    def describe(d: dict[str, Any]) -> Table:
        result = d.get("result") or {}
        progress = d.get("progress") or {}
        rows = [("status", d["status"]), ("vm", d.get("vm_identifier")),
                ("provider", d.get("provider")), ("created", d.get("created_at")),
                ("started", d.get("started_at")), ("finished", d.get("finished_at"))]
        if progress:
            rows += [("phase", progress.get("phase")),
                     ("progress", f"{progress.get('percentage')} %")]
        if d.get("error"):
            rows.append(("error", one_line(d["error"])))
        if result.get("domain_name"):
            rows += [("domain", result["domain_name"]),
                     ("disks", ", ".join(x["path"] for x in result.get("disks", [])))]
        return table(f"job {d['job_id']}", ["", ""], rows)

    c.emit(info, describe)


@jobs_app.command("logs")
def jobs_logs(ctx: typer.Context, job_id: str, follow_logs: Annotated[bool, typer.Option(
        "--follow", "-f", help="stream new lines until the job ends")] = False) -> None:
    """The job's logs."""
    c = ctx_of(ctx)
    if follow_logs:
        for line in c.daemon.stream_lines(f"/jobs/logs/{job_id}", follow="true"):
            c.out.print(line if c.as_json else _log_line(json.loads(line)), highlight=False,
                        markup=False, soft_wrap=True)
        return
    logs = c.daemon.get(f"/jobs/logs/{job_id}")
    if c.as_json:
        c.out.print_json(json.dumps(logs))
        return
    for entry in logs["logs"]:
        c.out.print(_log_line(entry), highlight=False, markup=False, soft_wrap=True)


def _log_line(entry: dict[str, Any]) -> str:
    return f"{str(entry['timestamp'])[:23]} {entry['level']:<7} {entry['message']}"


def job_action(ctx: typer.Context, path: str, body: dict[str, Any]) -> None:
    """POST a job action (`/jobs/cancel`, `/jobs/cutover`, ...) and say what it answered."""
    c = ctx_of(ctx)
    done = c.daemon.post(path, body)
    c.emit(done, lambda d: f"job {d['job_id']} {d['status']}: {d['message']}")


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: str) -> None:
    """Stop a job (a pending one never runs)."""
    job_action(ctx, "/jobs/cancel", {"job_id": job_id})


@jobs_app.command("cutover")
def jobs_cutover(ctx: typer.Context, job_id: str, at: Annotated[str | None, typer.Option(
        help="when (ISO 8601; a past time or none: now)")] = None) -> None:
    """Cut a warm migration over: stop the VM, copy the last changes, define the domain."""
    job_action(ctx, "/jobs/cutover", {"job_id": job_id, "at": at})


@jobs_app.command("test-boot")
def jobs_test_boot(ctx: typer.Context, job_id: str) -> None:
    """Boot an overlay of a warm job's copy as it is now (the VM keeps running)."""
    job_action(ctx, "/jobs/test-boot", {"job_id": job_id})


@jobs_app.command("rollback")
def jobs_rollback(ctx: typer.Context, job_id: str, remove_disks: Annotated[bool, typer.Option(
        help="remove the migrated disks too")] = False) -> None:
    """Undo a warm job's cutover: undefine its domain, power the source on again."""
    job_action(ctx, "/jobs/rollback", {"job_id": job_id, "remove_disks": remove_disks})


@jobs_app.command("retry")
def jobs_retry(ctx: typer.Context, job_id: str, follow_job: Annotated[bool, typer.Option(
        "--follow", "-f", help="watch it until it ends")] = False) -> None:
    """Run a failed or cancelled job again; finished steps are not redone."""
    c = ctx_of(ctx)
    done = c.daemon.post("/jobs/retry", {"job_id": job_id})
    if follow_job:
        finish_followed(c, follow(c.daemon, job_id, c.err, show=not c.as_json))
        return
    c.emit(done, lambda d: f"job {d['job_id']} {d['status']}: {d['message']}")


def global_flags_first(argv: list[str]) -> list[str]:
    """`--json` is the group's option, but scripts put it anywhere (`hyperctl jobs list
    --json`): move it before the command (never past a `--`)."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--json" not in argv[:end]:
        return argv
    return ["--json", *[a for a in argv[:end] if a != "--json"], *argv[end:]]


def main(argv: list[str] | None = None) -> int:
    """The console script: errors as one line on stderr and an exit code, never a
    traceback (click itself answers usage errors with 2)."""
    from hyperctl import resources  # noqa: F401 - registers its commands on `app`

    try:
        app(args=global_flags_first(sys.argv[1:] if argv is None else argv),
            prog_name="hyperctl")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except CtlError as exc:
        print(f"hyperctl: {exc}", file=sys.stderr)
        return exc.code
    except Exception as exc:  # noqa: BLE001 - anything unforeseen, said on one line
        print(f"hyperctl: {type(exc).__name__}: {one_line(str(exc))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
