"""Fleet tooling shared by the demo, the tests and the benchmarks: start moesaic processes,
wait until they serve, stop them gracefully then hard, find free ports.

>>> with ProcessTree(Path("logs")) as tree:                                  # doctest: +SKIP
...     port = free_port()
...     node = tree.spawn("node", ["moesaic", "node", "--listen", f"127.0.0.1:{port}"])
...     wait_grpc_ready(f"127.0.0.1:{port}", process=node)
"""

from moesaic.fleet.processes import Child, ProcessTree
from moesaic.fleet.ready import free_port, wait_grpc_ready, wait_grpc_serving

__all__ = ["Child", "ProcessTree", "free_port", "wait_grpc_ready", "wait_grpc_serving"]
