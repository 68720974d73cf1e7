"""Prometheus view of lease ownership (docs/several-instances.md#metrics).

Read from the Cluster at scrape time, like ``rtcauthd_jobs``, so nothing has to be kept
in step with the lease loop. Labelled with the instance name so that one dashboard over
all instances shows who holds what.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["ClusterCollector"]


class ClusterCollector:
    def __init__(self, cluster: Any) -> None:
        self._cluster = cluster

    def collect(self):
        c = self._cluster
        labels = ["instance"]
        value = [c.name]
        held = GaugeMetricFamily("rtcauthd_lease_held", "1 while this instance holds its liveness lease", labels=labels)
        held.add_metric(value, 1 if c.lease.holds() else 0)
        yield held
        owned = GaugeMetricFamily("rtcauthd_jobs_owned", "Delegated-leave jobs whose fencing token this instance holds",
                                  labels=labels)
        owned.add_metric(value, len(c.tokens))
        yield owned
        taken = CounterMetricFamily("rtcauthd_jobs_taken_over", "Jobs taken over from dead or departed instances",
                                    labels=labels)
        taken.add_metric(value, c.takeovers)
        yield taken
        routed = CounterMetricFamily("rtcauthd_webhooks_routed", "Webhooks for jobs run elsewhere, by outcome",
                                     labels=["instance", "result"])
        for result, count in sorted(c.routed.items()):
            routed.add_metric([c.name, result], count)
        yield routed
