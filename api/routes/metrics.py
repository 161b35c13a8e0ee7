"""/metrics: Prometheus' text format (api/metrics.py). Needs the API key, which Prometheus
sends as a bearer token (`authorization: {credentials: KEY}` in its scrape config), unless
daemon.metrics_public is true."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import MetricsDep, MetricsKeyDep

router = APIRouter(tags=["metrics"], dependencies=[MetricsKeyDep])


@router.get("/metrics", response_class=Response, responses={200: {"content": {
    CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
    "description": "Prometheus' text exposition format"}})
async def read_metrics(metrics: MetricsDep) -> Response:
    """Jobs, steps, bytes, webhooks, websocket clients and provider errors, as Prometheus
    reads them."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
