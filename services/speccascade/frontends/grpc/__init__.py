"""The gRPC front-end: the SpecCascade service and grpc.health.v1 (`servicer.py`), between
protobuf messages and the engine's types (`convert.py`), and what runs inside Serve's gRPC proxy
(`proxy.py`)."""
