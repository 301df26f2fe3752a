"""The node: a gRPC server speaking KServe v2 plus moesaic.v1.Node, serving a model folder."""
