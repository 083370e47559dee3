"""Ray Data (2.60) starts every execution, so every epoch, on zero resources for up to a second.

A new streaming executor learns what it may use from Ray Data's autoscaling coordinator (an
actor). Its first question is sent when it first needs the answer, which is then not back: the
executor sees 0 CPUs and keeps that figure for ``ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S``
(1 s). Meanwhile only Ray's liveness rule starts tasks, one at a time: on 2 CPUs an epoch's
first second ran one read task instead of two (``dinor1 bench data --peer``; traced with the
executor's dispatch decisions, 2026-12-04). Asking again every 0.1 s gets the real limits after
the coordinator's first answer (~0.1 s); later refreshes are one non-blocking actor call each.

:func:`refresh_limits_sooner` sets the interval. It must run in the process that runs the
executor: the driver for ``Dataset.iter_batches``, Ray Train's split coordinator actor for
``get_dataset_shard``. ``dinor1.data.datasource`` calls it on import, which every process that
unpickles a dataset of ours does.
"""

from __future__ import annotations

LIMITS_REFRESH_S = 0.1


def refresh_limits_sooner() -> bool:
    """Lets Ray Data's executors refresh their resource limits every ``LIMITS_REFRESH_S``
    (never slower than Ray's own interval); False when this Ray has no such setting."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:  # a Ray that moved it: nothing to change
        return False
    interval = getattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", None)
    if not isinstance(interval, (int, float)):
        return False
    ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = min(interval, LIMITS_REFRESH_S)
    return True
