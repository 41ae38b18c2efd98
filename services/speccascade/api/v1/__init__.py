"""Generated gRPC stubs of speccascade.v1 (scripts/gen_protos.py). DO NOT EDIT."""
