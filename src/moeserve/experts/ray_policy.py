"""Serve's autoscaling policy for expert functions (imported by Serve's controller: no torch, no Ray).

Serve's default policy samples each replica's requests in flight a few times per look-back window
(every look_back x 0.2 s) and averages the samples. An expert call lasts milliseconds, so the samples
almost never catch one: a function called all through a burst read as idle, went to zero replicas
mid-burst, and never scaled up (measured: scripts/ray_burst.py, docs/scale-out.md). Each replica
therefore reports, per recording interval, the time-integrated concurrency of its calls (call seconds
per wall second: 1.0 = always busy with one call) and the number of calls it received
(`ExpertReplica.record_autoscaling_stats`); Serve averages both over the look-back window.

    desired replicas = 0                                   no activity for a whole look-back window
                     = max(1, ceil(concurrency / target))  otherwise (concurrency summed over replicas)

Activity: a call or a request queued at a handle in the window, or replicas still starting (a replica
that has not run yet has no figures: it must not be stopped for having taken no call). Serve's wrapper
then applies min/max replicas and the up/downscale delays (`ray_config`): a function goes to zero
look-back + downscale_to_zero_delay = its keep-alive after its last activity.
"""

from __future__ import annotations

import math
import time

POLICY = "moeserve.experts.ray_policy:expert_function_policy"
CONCURRENCY, CALLS = "concurrency", "calls"
LAST_ACTIVE = "moeserve_last_active"


def desired_replicas(concurrency: float, idle_s: float, look_back_s: float, target: float) -> int:
    """Replicas for a function whose replicas were busy `concurrency` call-seconds per second (summed) over
    the look-back window and last active `idle_s` ago."""
    if idle_s >= look_back_s:
        return 0
    return max(1, math.ceil(concurrency / max(target, 1e-9) - 1e-9))


def expert_function_policy(ctx) -> tuple[int, dict]:
    """Serve's custom policy hook: ctx is a ray.serve.config.AutoscalingContext; the policy state keeps
    the time of the function's last activity."""
    metrics = ctx.aggregated_metrics or {}
    concurrency = sum(metrics.get(CONCURRENCY, {}).values())
    calls = sum(metrics.get(CALLS, {}).values())
    now = ctx.current_time if ctx.current_time is not None else time.time()
    starting = ctx.target_num_replicas > len(ctx.running_replicas)
    last = ctx.policy_state.get(LAST_ACTIVE, now)
    if calls > 0 or (ctx.total_num_requests or 0) > 0 or starting:
        last = now
    desired = desired_replicas(concurrency, now - last, float(ctx.config.look_back_period_s),
                               float(ctx.config.target_ongoing_requests))
    return desired, {LAST_ACTIVE: last}
