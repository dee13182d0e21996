"""The gRPC and HTTP surfaces: the gate and server, the v1 services, transport limits, HTTP."""
