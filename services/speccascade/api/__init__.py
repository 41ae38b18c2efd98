"""The gRPC API: generated stubs (`speccascade.api.v1`, see scripts/gen_protos.py) and a Python
client (`speccascade.api.client`)."""
