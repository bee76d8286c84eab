"""Serve autoscaling for draft replicas: as many as the sequences they hold need.

Drafts travel over the internal gRPC service, not through Serve, so Serve's request counts do not
see them. Each replica reports the sequences whose context it holds (record_autoscaling_stats);
this policy asks for ceil(total / target) replicas. Serve applies min/max replicas and the
up/down-scale delays. Serve ships this module to its controller by value: it imports nothing of
specserve. Nothing imports it: cluster/app.py names it (`policy_function`,
"specserve.cluster.autoscaling:DraftReplicaPolicy") and Serve loads it by that name.
"""

from __future__ import annotations

import math


class DraftReplicaPolicy:
    def __init__(self, target_sequences: float = 8.0):
        self.target_sequences = float(target_sequences)

    def __call__(self, ctx):
        per_replica = (ctx.aggregated_metrics or {}).get("sequences") or {}
        total = sum(per_replica.values())
        return math.ceil(total / self.target_sequences), {"sequences": total}
