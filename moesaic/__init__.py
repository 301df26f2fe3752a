"""moesaic: a collaborative perception runtime for edge fleets.

Nodes serve perception experts over the KServe v2 gRPC protocol; a coordinator picks, per
request, the set of experts whose fused answer is best under the request's latency and
energy budgets (MoE²), runs them in parallel and fuses their outputs.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
