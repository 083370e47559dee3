"""Ray Data's executors refresh their resource limits soon enough to use the cluster from an
epoch's start (dinor1.data.executor_limits)."""

from ray.data._internal.execution.resource_manager import ResourceManager

import dinor1.data.datasource  # noqa: F401  (sets it on import, as where a dataset is unpickled)
from dinor1.data.executor_limits import LIMITS_REFRESH_S, refresh_limits_sooner


def test_limits_refresh_every_tenth_of_a_second_once_the_datasource_is_imported():
    assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == LIMITS_REFRESH_S
    assert refresh_limits_sooner()  # this Ray still has the setting
    assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == LIMITS_REFRESH_S
