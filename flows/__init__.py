"""Prefect flows. Every flow is served as a deployment of this name (`<flow>/hypervisord`)."""

DEPLOYMENT = "hypervisord"
