"""Prometheus text exposition, rendered on demand from the controller's state plus API latency."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.hist: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self.sums: dict[tuple[str, str], float] = defaultdict(float)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests[(method, route, status)] += 1
        key = (method, route)
        h = self.hist[key]
        for i, b in enumerate(BUCKETS):
            if seconds <= b:
                h[i] += 1
                break
        else:
            h[-1] += 1
        self.sums[key] += seconds

    def render(self, hv: Any) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        metric("microvmd_vms", "gauge", "VMs by state")
        for state, n in hv.counts().items():
            out.append(f'microvmd_vms{{state="{state}"}} {n}')
        metric("microvmd_fuel_consumed_total", "counter", "Fuel consumed by all guests")
        out.append(f"microvmd_fuel_consumed_total {hv.fuel_total()}")
        metric("microvmd_images", "gauge", "Images in the store")
        out.append(f"microvmd_images {len(hv.images.images)}")
        metric("microvmd_compiles_total", "counter", "Modules compiled (cache misses)")
        out.append(f"microvmd_compiles_total {hv.images.compiles}")
        metric("microvmd_vcpu_slices_total", "counter", "Scheduling slices run on vCPU workers")
        out.append(f"microvmd_vcpu_slices_total {hv.sched.slices}")
        for dev in hv.devices:
            out.extend(dev.metrics(hv))
        out.extend(hv.loop_lag.metrics())
        metric("microvmd_api_requests_total", "counter", "API requests by route and status")
        for (m, r, s), n in sorted(self.requests.items()):
            out.append(f'microvmd_api_requests_total{{method="{m}",route="{r}",status="{s}"}} {n}')
        metric("microvmd_api_request_seconds", "histogram", "API latency")
        for (m, r), h in sorted(self.hist.items()):
            acc = 0
            for b, n in zip(BUCKETS, h, strict=False):
                acc += n
                out.append(f'microvmd_api_request_seconds_bucket{{method="{m}",route="{r}",le="{b}"}} {acc}')
            acc += h[-1]
            out.append(f'microvmd_api_request_seconds_bucket{{method="{m}",route="{r}",le="+Inf"}} {acc}')
            out.append(f'microvmd_api_request_seconds_sum{{method="{m}",route="{r}"}} {self.sums[(m, r)]:.6f}')
            out.append(f'microvmd_api_request_seconds_count{{method="{m}",route="{r}"}} {acc}')
        return "\n".join(out) + "\n"
