"""The node provider of ``dinor1 cluster local up --autoscaling`` (``cluster/local-autoscaling.yaml``,
provider ``type: external``): Ray's fake multi-node provider, whose nodes are real raylets on
this machine, with two changes:

- Its nodes share the head's session folder, and each ran a log monitor over the same log
  files, so a driver printed every worker line once per node (four times with three nodes).
  Here the nodes start without a log monitor; the head's reads every file and forwards each
  line once.
- A node whose raylet died (killed, crashed) stayed on its list forever, "uninitialized" to the
  autoscaler, which never replaced it. Here such a node is reported terminated, as a cloud
  reports a lost instance, and what is left of it is stopped; the autoscaler then launches a
  new one if work still needs it.
"""

from __future__ import annotations

import ray._private.parameter as ray_parameter
import ray._private.ray_constants as ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class LoopbackNodeProvider(FakeMultiNodeProvider):
    """:class:`FakeMultiNodeProvider` whose nodes run no log monitor of their own."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources,
                                               labels):
        original = ray_parameter.RayParams

        class NodeParams(original):  # the parameters the provider builds for each node
            def __init__(self, **kwargs):
                kwargs["include_log_monitor"] = False
                super().__init__(**kwargs)

        with self.lock:  # (the provider's own lock: one node at a time)
            ray_parameter.RayParams = NodeParams
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count,
                                                               resources, labels)
            finally:
                ray_parameter.RayParams = original

    def non_terminated_nodes(self, tag_filters):
        self._drop_lost_nodes()
        return super().non_terminated_nodes(tag_filters)

    def _drop_lost_nodes(self) -> None:
        with self.lock:
            for node_id, entry in list(self._nodes.items()):
                node = entry.get("node")  # (None for the head: not started here)
                raylets = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, []) \
                    if node is not None else []
                if raylets and raylets[0].process.poll() is not None:
                    del self._nodes[node_id]
                    node.kill_all_processes(check_alive=False, allow_graceful=False)
