"""Prometheus metrics, made by prometheus-client.

The controller's state (VMs by state, fuel, images, compiles, vCPU slices, the devices' counters, event-loop
lag) is read at scrape time by ``StateCollector``; API request counts and latency are the library's own
``Counter`` and ``Histogram``. Each application has a private ``CollectorRegistry``, so several daemons (or
test apps) in one process never share or clash over series.
"""
from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import logsafe

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# generate_latest() writes the classic text format, whatever CONTENT_TYPE_LATEST says in newer releases
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StateCollector(Collector):
    """The controller's state as metric families, read when /metrics is asked for (nothing to keep in step)."""

    def __init__(self, hv: Any, functions: Any = None) -> None:
        self.hv = hv
        self.functions = functions

    def collect(self) -> Iterator[Metric]:
        hv = self.hv
        if self.functions is not None:
            yield from _function_metrics(self.functions)
        vms = GaugeMetricFamily("microvmd_vms", "VMs by state", labels=["state"])
        for state, n in hv.counts().items():
            vms.add_metric([state], n)
        yield vms
        yield CounterMetricFamily("microvmd_fuel_consumed_total", "Fuel consumed by all guests",
                                  value=hv.fuel_total())
        yield GaugeMetricFamily("microvmd_images", "Images in the store", value=len(hv.images.images))
        yield CounterMetricFamily("microvmd_compiles_total", "Modules compiled (cache misses)",
                                  value=hv.images.compiles)
        comp = hv.compiler
        yield GaugeMetricFamily("microvmd_compile_admitted", "Image imports being compiled or waiting for the "
                                "compile pool (limits.compile_jobs + limits.compile_queue)", value=comp.admitted)
        yield CounterMetricFamily("microvmd_compile_refused_total", "Image imports refused with 503 compile_busy",
                                  value=comp.refused)
        yield CounterMetricFamily("microvmd_compile_children_total", "Modules compiled in a child process",
                                  value=comp.children)
        yield CounterMetricFamily("microvmd_vcpu_slices_total", "Scheduling slices run on vCPU workers",
                                  value=hv.sched.slices)
        for dev in hv.devices:
            yield from dev.metrics(hv)
        yield from hv.loop_lag.metrics()
        yield GaugeMetricFamily("microvmd_gc_frozen_objects", "Objects made at start-up, kept out of the cycle "
                                "collector's full collections (gc.freeze)", value=gc.get_freeze_count())
        yield from hv.heap_trim.metrics()
        budget = GaugeMetricFamily("microvmd_memory_budget_bytes", "Linear memory of all guests: the budget "
                                   "(limits.total_memory) and what they hold", labels=["kind"])
        budget.add_metric(["total"], hv.builder.memory.total)
        budget.add_metric(["used"], hv.builder.memory.used)
        yield budget
        yield CounterMetricFamily("microvmd_console_holds_total", "Times a VM was held off its vCPU for writing "
                                  "console output faster than limits.log_rate", value=hv.console_holds)
        yield CounterMetricFamily("microvmd_console_held_seconds_total", "Seconds VMs were held for their "
                                  "console output rate", value=hv.console_held_s)
        yield CounterMetricFamily("microvmd_log_suppressed_total",
                                  "Log lines of repeated events left out by their throttle (the events are "
                                  "counted by their own metrics)", value=logsafe.suppressed_total)


def _function_metrics(functions: Any) -> Iterator[Metric]:
    from ..functions.service import LATENCY_BUCKETS

    calls = CounterMetricFamily("microvmd_function_invocations_total", "Requests served by each function",
                                labels=["function"])
    errors = CounterMetricFamily("microvmd_function_errors_total", "Requests a function did not answer itself, "
                                 "by kind (timeout, trap, out_of_fuel, handler_error, bad_response, overloaded...)",
                                 labels=["function", "kind"])
    instances = GaugeMetricFamily("microvmd_function_instances", "Instances running now, idle ones (spares, "
                                  "--reuse warm ones), and requests queued",
                                  labels=["function", "kind"])
    latency = HistogramMetricFamily("microvmd_function_request_seconds", "Time to answer a request (queue, "
                                    "fresh instance, run)", labels=["function"])
    for fn in functions.ordered():
        calls.add_metric([fn.name], fn.invocations)
        for kind, n in sorted(fn.errors.items()):
            errors.add_metric([fn.name, kind], n)
        instances.add_metric([fn.name, "running"], fn.active)
        instances.add_metric([fn.name, "queued"], fn.queued)
        instances.add_metric([fn.name, "idle"], len(fn.spares) + len(fn.warm))  # spares and --reuse warm ones
        counts = fn.latency
        buckets = [(str(b), counts[i]) for i, b in enumerate(LATENCY_BUCKETS)] + [("+Inf", counts[-1])]
        latency.add_metric([fn.name], buckets, fn.latency_sum)
    yield from (calls, errors, instances, latency)
    stats = functions.gateway_stats
    if stats is not None:
        yield GaugeMetricFamily("microvmd_gateway_connections", "Connections the function gateway holds now",
                                value=stats.open)
        yield GaugeMetricFamily("microvmd_gateway_connections_max", "Connections the gateway holds at most "
                                "([daemon] gateway_connections)", value=stats.cap)
        yield CounterMetricFamily("microvmd_gateway_connections_refused_total", "Gateway connections answered "
                                  "503 and closed at the cap", value=stats.refused)


class Metrics:
    """One application's registry: the state collector plus the API's request counter and latency histogram."""

    def __init__(self, hv: Any, functions: Any = None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(StateCollector(hv, functions))
        self.requests = Counter("microvmd_api_requests_total", "API requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("microvmd_api_request_seconds", "API latency", ["method", "route"],
                                 buckets=BUCKETS, registry=self.registry)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        # the labelled children by key: labels() costs ~4 µs a call, on every request's path
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(method, route, str(status)),
                                              self.latency.labels(method, route))
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
