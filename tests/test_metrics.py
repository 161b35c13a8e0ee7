"""GET /metrics against the session's daemon, read with prometheus_client's own parser:
counters and histograms that move after real jobs, a provider error, a webhook attempt,
a websocket client; the key required unless daemon.metrics_public."""

from __future__ import annotations

import httpx
import websockets.sync.client
from prometheus_client.parser import text_string_to_metric_families

from hyper2kvm.sample import make_sample_ova
from tests.helpers import make_truncated_ova
from tests.peers import (
    SESSION_DIR,
    Daemon,
    free_port,
    start_daemon,
    stop_daemon,
    unique,
    wait_for_job,
    wait_until,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(api: httpx.Client) -> Samples:
    response = api.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def submit(api: httpx.Client, vm: str) -> str:
    response = api.post("/jobs/submit", json={"vm_identifier": vm, "provider": "local"})
    assert response.status_code == 200, response.text
    return str(response.json()["job_id"])


def test_metrics_follow_real_jobs(api: httpx.Client, daemon: Daemon) -> None:
    before = scrape(api)
    good, bad = unique("metrics"), unique("metrics-bad")
    make_sample_ova(daemon.inbox, good, size_mib=32, random_mib=8)
    make_truncated_ova(daemon.inbox, bad)
    done = wait_for_job(api, submit(api, good))
    failed = wait_for_job(api, submit(api, bad))
    assert done["status"] == "completed" and failed["status"] == "failed"

    def moved() -> Samples | None:
        now = scrape(api)
        finished = [value(now, "hypersdk_jobs_finished_total", provider="local", status=s)
                    - value(before, "hypersdk_jobs_finished_total", provider="local", status=s)
                    for s in ("completed", "failed")]
        return now if finished == [1.0, 1.0] else None

    after = wait_until(moved, timeout=30, interval=0.5, what="the jobs in the metrics")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # one observation per job run, in the histogram of its outcome
    for status in ("completed", "failed"):
        assert delta("hypersdk_job_duration_seconds_count", provider="local",
                     status=status) == 1.0
    assert delta("hypersdk_job_duration_seconds_sum", provider="local",
                 status="completed") > 0
    steps = done["result"]["step_seconds"]
    for step in ("validate", "export", "convert", "register"):
        assert step in steps
        assert delta("hypersdk_step_duration_seconds_count", provider="local", step=step) == 1
    assert abs(delta("hypersdk_step_duration_seconds_sum", provider="local", step="convert")
               - steps["convert"]) < 1e-6
    # bytes: the image written, and what the export read (nothing when it hard-linked)
    capacity = sum(disk["virtual_size"] for disk in done["result"]["disks"])
    assert capacity > 0
    assert delta("hypersdk_converted_bytes_total", provider="local") == capacity
    export = done["result"]["export"]
    read = 0 if export["linked"] else sum(file["size"] for file in export["files"])
    assert delta("hypersdk_exported_bytes_total", provider="local") == read
    assert value(after, "hypersdk_jobs", status="running") >= 0
    assert "hypersdk_export_slots_in_use" in {name for name, _ in after}


def test_provider_errors_webhooks_and_websocket_clients(api: httpx.Client,
                                                        daemon: Daemon) -> None:
    before = scrape(api)
    missing = api.get("/vms/info", params={"identifier": unique("nowhere"),
                                           "provider": "local"})
    assert missing.status_code == 404
    after = scrape(api)
    assert value(after, "hypersdk_provider_errors_total", provider="local", kind="not_found") \
        - value(before, "hypersdk_provider_errors_total", provider="local",
                kind="not_found") == 1
    # a webhook whose receiver is down: its test delivery fails and waits for a retry
    hook = api.post("/webhooks/configure", json={"url": f"http://127.0.0.1:{free_port()}/h",
                                                 "events": ["job.completed"]}).json()
    try:
        attempt = api.post(f"/webhooks/{hook['id']}/test").json()
        assert attempt["status"] == "pending" and attempt["attempts"] == 1
        now = scrape(api)
        assert value(now, "hypersdk_webhook_deliveries_total", outcome="retrying") \
            - value(before, "hypersdk_webhook_deliveries_total", outcome="retrying") >= 1
        assert value(now, "hypersdk_webhook_outbox_backlog") >= 1
    finally:
        api.delete(f"/webhooks/{hook['id']}")
    clients = value(scrape(api), "hypersdk_websocket_clients")
    url = daemon.url.replace("http", "ws") + f"/websocket?token={daemon.api_key}"
    with websockets.sync.client.connect(url) as socket:
        socket.recv(timeout=10)  # the snapshot: the daemon has counted us
        assert value(scrape(api), "hypersdk_websocket_clients") == clients + 1
    wait_until(lambda: value(scrape(api), "hypersdk_websocket_clients") == clients,
               timeout=10, what="the client gone from the gauge")


def test_metrics_need_the_key_unless_public(daemon: Daemon) -> None:
    with daemon.client(key=None) as anonymous:
        refused = anonymous.get("/metrics")
    assert refused.status_code == 401 and "API key" in refused.json()["message"]
    with daemon.client(key="wrong") as wrong:
        assert wrong.get("/metrics").status_code == 401
    public = start_daemon(SESSION_DIR / unique("public-metrics"), api_key="k",
                          extra_daemon="  metrics_public: true\n")
    try:
        with public.client(key=None) as anonymous:
            assert anonymous.get("/metrics").status_code == 200
            assert anonymous.get("/jobs/query").status_code == 401  # only /metrics is open
    finally:
        stop_daemon(public)
