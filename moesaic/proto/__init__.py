"""Generated gRPC stubs (tools/gen_proto.py). Do not edit."""
