"""Protocol front-ends: thin adapters that turn a protocol's request into the serving core's two
calls (`RouterCore.admit`, `RouterCore.serve_request`) and the core's chunks into the protocol's
responses. `grpc/`: the SpecCascade service and gRPC health; `openai/`: the OpenAI-compatible
HTTP API."""
