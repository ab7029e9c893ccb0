"""GET /metrics is made by prometheus-client: it parses with the library's own parser, keeps the metric
names and labels the docs and dashboards use, and each app has a registry of its own."""
from __future__ import annotations

from typing import Any

from mvapi import Api
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from microvmd.api.metrics import Metrics


def test_metrics_parse_with_prometheus_client(api: Api) -> None:
    vm = api.create("hello", start=True)
    api.wait(vm["id"])
    api.ok("GET", "/v1/info")
    r = api("GET", "/metrics")
    assert r.status == 200 and r.content_type.startswith("text/plain; version=0.0.4"), r.headers
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}

    types = {name: f.type for name, f in fams.items()}
    for name, kind in {"microvmd_vms": "gauge", "microvmd_fuel_consumed": "counter", "microvmd_images": "gauge",
                       "microvmd_compiles": "counter", "microvmd_vcpu_slices": "counter",
                       "microvmd_event_loop_lag_seconds_max": "gauge", "microvmd_event_loop_stalls": "counter",
                       "microvmd_disks": "gauge", "microvmd_api_requests": "counter",
                       "microvmd_api_request_seconds": "histogram", "microvmd_heap_trims": "counter",
                       "microvmd_heap_trim_seconds": "counter"}.items():
        assert types.get(name) == kind, (name, types)
    assert not [n for n in fams if n.endswith("_created")], "no _created series (disabled in the daemon)"

    by_state = {s.labels["state"]: s.value for s in fams["microvmd_vms"].samples}
    assert set(by_state) == {"created", "running", "paused", "out_of_fuel", "exited", "stopped"}
    assert by_state["exited"] >= 1
    assert fams["microvmd_fuel_consumed"].samples[0].value > 0
    assert fams["microvmd_images"].samples[0].value >= 1
    # start-up's objects are out of the cycle collector's full collections (event-loop pauses of 20-30 ms
    # under load otherwise)
    assert fams["microvmd_gc_frozen_objects"].samples[0].value > 10_000

    created = [s for s in fams["microvmd_api_requests"].samples
               if s.name == "microvmd_api_requests_total"
               and s.labels == {"method": "POST", "route": "/v1/vms", "status": "201"}]
    assert created and created[0].value >= 1

    def info(suffix: str) -> list[Any]:
        return [s for s in fams["microvmd_api_request_seconds"].samples
                if s.name == "microvmd_api_request_seconds" + suffix
                and s.labels.get("method") == "GET" and s.labels.get("route") == "/v1/info"]
    buckets = info("_bucket")
    assert buckets[-1].labels["le"] == "+Inf"
    counts = [s.value for s in buckets]
    assert counts == sorted(counts) and counts[-1] >= 1
    assert [s.value for s in info("_count")] == [counts[-1]]
    assert info("_sum")[0].value > 0


def test_each_app_has_a_private_registry() -> None:
    a, b = Metrics(object()), Metrics(object())  # two apps in one process: no DuplicateTimeseries
    a.observe("GET", "/v1/info", 200, 0.001)

    def total(m: Metrics) -> float:
        return sum(s.value for f in m.requests.collect() for s in f.samples if s.name.endswith("_total"))
    assert (total(a), total(b)) == (1, 0)
    assert REGISTRY.get_sample_value("microvmd_api_requests_total",
                                     {"method": "GET", "route": "/v1/info", "status": "200"}) is None
