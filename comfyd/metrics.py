"""Prometheus metrics: the seed's six names, labels and buckets, plus comfyd's own.

Each service instance owns a ``CollectorRegistry`` (tests run several in one process). Label values stay
bounded: statuses, error types, pools, backends, GPU ids and route templates, never workflow ids.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

disable_created_metrics()  # the *_created series only add noise for dashboards

DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
STATUSES = ("queued", "started", "completed", "failed", "cancelled")
ERROR_TYPES = ("validation", "oom", "node_error", "timeout", "backend_unavailable", "backend_lost", "internal")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # -- the seed's contract ---------------------------------------------------------------------------
        self.workflow_total = Counter("comfyui_workflow_total", "Total number of ComfyUI workflows",
                                      ["status"], registry=r)
        self.workflow_duration = Histogram("comfyui_workflow_duration_seconds",
                                           "Duration of ComfyUI workflow execution", ["gpu_type"],
                                           buckets=DURATION_BUCKETS, registry=r)
        self.workflow_errors = Counter("comfyui_workflow_errors_total", "Total number of ComfyUI workflow errors",
                                       ["error_type"], registry=r)
        self.gpu_utilization = Gauge("comfyui_gpu_utilization", "GPU utilization percentage for ComfyUI",
                                     ["gpu_id"], registry=r)
        self.vram_usage = Gauge("comfyui_vram_usage_bytes", "VRAM usage in bytes for ComfyUI", ["gpu_id"],
                                registry=r)
        self.queue_length = Gauge("comfyui_queue_length", "Number of workflows in queue", registry=r)
        # -- comfyd's own ----------------------------------------------------------------------------------
        self.vram_total = Gauge("comfyui_vram_total_bytes", "Total VRAM in bytes", ["gpu_id"], registry=r)
        self.gpu_temperature = Gauge("comfyui_gpu_temperature_celsius", "GPU temperature", ["gpu_id"], registry=r)
        self.gpu_power = Gauge("comfyui_gpu_power_watts", "GPU power draw", ["gpu_id"], registry=r)
        self.queue_wait = Histogram("comfyd_queue_wait_seconds", "Time from submit to execution start",
                                    ["gpu_type"], buckets=WAIT_BUCKETS, registry=r)
        self.workflows_running = Gauge("comfyd_workflows_running", "Workflows running on a backend", registry=r)
        self.backend_up = Gauge("comfyd_backend_up", "1 if the backend is reachable", ["backend", "pool"],
                                registry=r)
        self.backend_busy = Gauge("comfyd_backend_busy", "Jobs held by the backend (running + waiting inside it)",
                                  ["backend", "pool"], registry=r)
        self.http_requests = Counter("comfyd_http_requests_total", "HTTP requests", ["method", "route", "status"],
                                     registry=r)
        self.http_latency = Histogram("comfyd_http_request_duration_seconds", "HTTP request latency",
                                      ["method", "route"], registry=r)
        self.ws_clients = Gauge("comfyd_ws_clients", "WebSocket clients connected", registry=r)
        self.ws_dropped = Counter("comfyd_ws_messages_dropped_total", "WebSocket messages dropped",
                                  ["reason"], registry=r)
        self.ws_disconnected_slow = Counter("comfyd_ws_slow_clients_dropped_total",
                                            "WebSocket clients closed for falling behind", registry=r)
        self.db_batches = Counter("comfyd_db_commit_batches_total", "Group-commit transactions", registry=r)
        for status in STATUSES:
            self.workflow_total.labels(status=status)
        for error_type in ERROR_TYPES:
            self.workflow_errors.labels(error_type=error_type)
        for reason in ("slow_client", "broadcaster_busy"):
            self.ws_dropped.labels(reason=reason)
