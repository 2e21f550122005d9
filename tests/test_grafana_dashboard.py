"""The Grafana dashboard in config/grafana/comfyd.json: a valid dashboard whose every query names a series that
comfyd's ``/metrics`` exposes, with labels those metrics carry. Each expression is also parsed by ``promtool``
when it is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from comfyd.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "config" / "grafana" / "comfyd.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus, not by comfyd

FUNCTIONS_AND_KEYWORDS = {
    # aggregation operators and their modifiers
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio", "by", "without",
    # binary operators and vector matching
    "and", "or", "unless", "bool", "on", "ignoring", "group_left", "group_right", "offset", "atan2",
    # literals
    "inf", "nan",
}
# a metric name: an identifier not followed by "(" (that is a function call), not a keyword
IDENT = re.compile(r"(?<![\w:$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return panels


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def exprs(dashboard: dict[str, Any]) -> list[str]:
    found = [t["expr"] for p in query_panels(dashboard) for t in p["targets"]]
    found += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return found


def metric_names(expr: str) -> set[str]:
    """Every metric name an expression selects (Grafana's label_values(metric, label) included)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = LABEL_LIST.sub(" ", text)  # by (le, gpu_type) ...
    text = re.sub(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:,\s*[a-zA-Z_]\w*\s*)?\)", r"\1", text)
    return {name for name in IDENT.findall(text) if name.lower() not in FUNCTIONS_AND_KEYWORDS}


def exposed_series() -> dict[str, set[str]]:
    """Series name -> label names, for everything comfyd's /metrics exposes (a histogram as _bucket/_sum/_count,
    a counter as its _total), read from the rendered exposition so that a declared-but-unused family counts."""
    metrics = Metrics()
    labels = {c._name: set(c._labelnames) for c in vars(metrics).values()  # noqa: SLF001
              if isinstance(c, MetricWrapperBase)}
    text = generate_latest(metrics.registry).decode()
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        names = {
            "counter": [family.name + "_total"],
            "gauge": [family.name],
            "histogram": [family.name + "_bucket", family.name + "_sum", family.name + "_count"],
        }[family.type]
        own = labels.get(family.name, set())
        for name in names:
            series[name] = own | {"le"} if name.endswith("_bucket") else set(own)
    return series


# -- the dashboard ----------------------------------------------------------------------------------------------
def test_is_a_grafana_dashboard_with_a_prometheus_input():
    d = load()
    assert d["schemaVersion"] >= 36 and d["title"] and d["uid"]
    assert {"name": "DS_PROMETHEUS", "type": "datasource", "pluginId": "prometheus"}.items() <= \
        d["__inputs"][0].items()
    assert d["id"] is None  # importable
    ids = [p["id"] for p in all_panels(d)]
    assert len(ids) == len(set(ids))
    for panel in query_panels(d):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["title"] and panel["targets"], panel["title"]
        pos = panel["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == DATASOURCE and t["expr"].strip(), panel["title"]
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
    for variable in d["templating"]["list"]:
        assert variable["datasource"] == DATASOURCE


def test_covers_what_operators_watch():
    used = set().union(*(metric_names(e) for e in exprs(load())))
    assert used >= {
        "comfyui_workflow_total", "comfyui_queue_length", "comfyd_queue_wait_seconds_bucket",
        "comfyui_workflow_duration_seconds_bucket", "comfyui_workflow_errors_total", "comfyui_gpu_utilization",
        "comfyui_vram_usage_bytes", "comfyui_vram_total_bytes", "comfyui_gpu_temperature_celsius",
        "comfyui_gpu_power_watts", "comfyd_backend_up", "comfyd_backend_busy", "comfyd_http_requests_total",
        "comfyd_http_request_duration_seconds_bucket", "comfyd_ws_clients", "comfyd_ws_messages_dropped_total",
    }


def test_every_metric_is_exposed_by_comfyd():
    exposed = exposed_series()
    for expr in exprs(load()):
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        missing = names - exposed.keys()
        assert not missing, f"{sorted(missing)} in {expr!r} is not in comfyd's /metrics"


def test_every_label_is_one_the_metrics_carry():
    exposed = exposed_series()
    d = load()
    for panel in query_panels(d):
        for t in panel["targets"]:
            expr = t["expr"]
            carried = set().union(*(exposed[n] for n in metric_names(expr))) | SCRAPE_LABELS
            used = {name for _, body in SELECTOR.findall(expr) for name in MATCHER_LABEL.findall(body)}
            used |= {x.strip() for _, body in LABEL_LIST.findall(expr) for x in body.split(",") if x.strip()}
            used |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            assert used <= carried, f"{sorted(used - carried)} in {panel['title']!r}: {expr!r}"


def test_the_extractor_itself():
    assert metric_names('histogram_quantile(0.95, sum by (le, gpu_type) (rate(x_bucket{a=~"$b"}[5m])))') == \
        {"x_bucket"}
    assert metric_names("sum(rate(a_sum[5m])) / sum(rate(a_count[5m])) and on (gpu_id) b") == \
        {"a_sum", "a_count", "b"}
    assert metric_names('label_values(comfyd_backend_up{instance=~"$instance"}, backend)') == {"comfyd_backend_up"}
    assert metric_names("100 * used / total") == {"used", "total"}


# -- PromQL syntax, when promtool is installed ------------------------------------------------------------------
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*",
                     "$gpu_id": ".*", "$backend": ".*"}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) is not installed")
def test_expressions_parse_with_promtool(tmp_path: Path):
    rules = []
    for i, panel in enumerate(query_panels(load())):
        for t in panel["targets"]:
            expr = t["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"an unknown Grafana variable in {t['expr']!r}"
            rules.append({"record": f"dashboard:panel{i}:{t['refId'].lower()}", "expr": expr})
    path = tmp_path / "dashboard.rules.json"  # JSON is YAML: promtool reads it as a rules file
    path.write_text(json.dumps({"groups": [{"name": "comfyd-dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
