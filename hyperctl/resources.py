"""hyperctl's schedules, backup-policies and webhooks commands: the same verbs over
each REST resource."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from hyperctl.client import UsageError
from hyperctl.main import ProviderOpt, app, ctx_of, table

schedules_app = typer.Typer(no_args_is_help=True, help="Migrations on a cron schedule.")
policies_app = typer.Typer(no_args_is_help=True, help="Scheduled backups with retention.")
webhooks_app = typer.Typer(no_args_is_help=True, help="Job events POSTed to a URL.")
app.add_typer(schedules_app, name="schedules")
app.add_typer(policies_app, name="backup-policies")
app.add_typer(webhooks_app, name="webhooks")


def _schedules_table(data: dict[str, Any]) -> Any:
    return table(f"{len(data['schedules'])} schedule(s)",
                 ["name", "cron", "timezone", "active", "vm", "next run"],
                 [(s["name"], s.get("cron"), s.get("timezone"), s["active"],
                   (s.get("job_definition") or {}).get("vm_identifier"),
                   (s.get("next_runs") or [""])[0]) for s in data["schedules"]])


def _one_schedule(data: dict[str, Any]) -> Any:
    return _schedules_table({"schedules": [data]})


@schedules_app.command("list")
def schedules_list(ctx: typer.Context) -> None:
    """Every schedule."""
    c = ctx_of(ctx)
    c.emit(c.daemon.get("/schedules"), _schedules_table)


@schedules_app.command("create")
def schedules_create(
    ctx: typer.Context, name: str,
    cron: Annotated[str, typer.Option(help="e.g. '0 2 * * *'")],
    vm: Annotated[str, typer.Option(help="the VM each run migrates")],
    provider: ProviderOpt = "local",
    timezone: Annotated[str | None, typer.Option(help="e.g. Europe/Paris")] = None,
    paused: Annotated[bool, typer.Option(help="create it inactive")] = False,
) -> None:
    """A schedule that migrates VM on CRON."""
    c = ctx_of(ctx)
    body = {"name": name, "cron": cron, "timezone": timezone, "active": not paused,
            "job_definition": {"vm_identifier": vm, "provider": provider}}
    c.emit(c.daemon.post("/schedules/create", body), _one_schedule)


@schedules_app.command("pause")
def schedules_pause(ctx: typer.Context, name: str) -> None:
    c = ctx_of(ctx)
    c.emit(c.daemon.post(f"/schedules/{name}/pause"), _one_schedule)


@schedules_app.command("resume")
def schedules_resume(ctx: typer.Context, name: str) -> None:
    c = ctx_of(ctx)
    c.emit(c.daemon.post(f"/schedules/{name}/resume"), _one_schedule)


@schedules_app.command("delete")
def schedules_delete(ctx: typer.Context, name: str) -> None:
    c = ctx_of(ctx)
    c.emit(c.daemon.delete(f"/schedules/{name}"), lambda d: f"schedule {name} deleted")


@schedules_app.command("trigger")
def schedules_trigger(ctx: typer.Context, name: str) -> None:
    """Run the schedule's job now."""
    c = ctx_of(ctx)
    c.emit(c.daemon.post(f"/schedules/{name}/trigger"),
           lambda d: f"job {d['job_id']} {d['status']}")


def _policies_table(data: dict[str, Any]) -> Any:
    rows = []
    for p in data["policies"]:
        policy = p.get("policy") or {}
        retention = policy.get("retention") or {}
        rows.append((p["name"], policy.get("provider"), policy.get("schedule"), p["active"],
                     retention.get("count"), (p.get("next_runs") or [""])[0]))
    return table(f"{len(rows)} backup polic{'y' if len(rows) == 1 else 'ies'}",
                 ["name", "provider", "schedule", "active", "keep", "next run"], rows)


@policies_app.command("list")
def policies_list(ctx: typer.Context) -> None:
    """Every backup policy."""
    c = ctx_of(ctx)
    c.emit(c.daemon.get("/backup-policies"), _policies_table)


@policies_app.command("create")
def policies_create(
    ctx: typer.Context, name: str,
    schedule: Annotated[str, typer.Option(help="cron, e.g. '0 2 * * *'")],
    provider: ProviderOpt = "vsphere",
    name_pattern: Annotated[str | None, typer.Option(help="VMs whose name matches")] = None,
    keep: Annotated[int, typer.Option(help="backups kept per VM")] = 7,
    max_age_days: Annotated[float | None, typer.Option(help="and none older")] = None,
    timezone: str | None = None,
    concurrency: Annotated[int, typer.Option(help="VMs backed up at once")] = 2,
) -> None:
    """A policy that backs up the matching VMs on SCHEDULE and keeps KEEP of each."""
    c = ctx_of(ctx)
    body: dict[str, Any] = {
        "name": name, "provider": provider, "schedule": schedule, "timezone": timezone,
        "vm_filter": {"name_pattern": name_pattern} if name_pattern else {},
        "retention": {"count": keep, "age_days": max_age_days}, "concurrency": concurrency}
    created = c.daemon.post("/backup-policies/create", body)
    c.emit(created, lambda d: _policies_table({"policies": [d]}))


@policies_app.command("run")
def policies_run(ctx: typer.Context, name: str) -> None:
    """Back up now."""
    c = ctx_of(ctx)
    c.emit(c.daemon.post(f"/backup-policies/{name}/run"),
           lambda d: f"job {d['job_id']} {d['status']}")


@policies_app.command("delete")
def policies_delete(ctx: typer.Context, name: str) -> None:
    c = ctx_of(ctx)
    c.emit(c.daemon.delete(f"/backup-policies/{name}"), lambda d: f"policy {name} deleted")


@webhooks_app.command("list")
def webhooks_list(ctx: typer.Context) -> None:
    """Every webhook (secrets never shown)."""
    c = ctx_of(ctx)
    c.emit(c.daemon.get("/webhooks"), lambda d: table(
        f"{len(d['webhooks'])} webhook(s)", ["id", "url", "events", "source"],
        [(w["id"], w["url"], ",".join(w.get("events") or []), w.get("source"))
         for w in d["webhooks"]]))


@webhooks_app.command("add")
def webhooks_add(
    ctx: typer.Context, url: str,
    event: Annotated[list[str] | None, typer.Option(help="job.completed, job.failed, ... "
                                                         "(repeat; default: the daemon's)")]
    = None,
    header: Annotated[list[str] | None, typer.Option(help="NAME=VALUE (repeat)")] = None,
    secret: Annotated[str | None, typer.Option(help="HMAC key (generated if omitted)")] = None,
) -> None:
    """Subscribe URL; the signing secret is shown once."""
    c = ctx_of(ctx)
    headers = {}
    for item in header or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--header expects NAME=VALUE, got {item!r}")
        headers[name] = value
    body: dict[str, Any] = {"url": url, "headers": headers, "secret": secret}
    if event:
        body["events"] = event
    added = c.daemon.post("/webhooks/configure", {k: v for k, v in body.items()
                                                  if v is not None})
    c.emit(added, lambda d: f"webhook {d['id']} → {d['url']}; secret (shown once): "
                            f"{d.get('secret')}")


@webhooks_app.command("test")
def webhooks_test(ctx: typer.Context, webhook_id: str) -> None:
    """Send a webhook.test event and show its first attempt."""
    c = ctx_of(ctx)
    c.emit(c.daemon.post(f"/webhooks/{webhook_id}/test"), lambda d: table(
        f"test of webhook {webhook_id}", ["status", "attempts", "response", "error"],
        [(d.get("status"), d.get("attempts"), d.get("response_status"),
          d.get("last_error"))]))


@webhooks_app.command("remove")
def webhooks_remove(ctx: typer.Context, webhook_id: str) -> None:
    c = ctx_of(ctx)
    c.emit(c.daemon.delete(f"/webhooks/{webhook_id}"), lambda d: f"webhook {webhook_id} removed")
