"""`speccascade bench backend`: the model backends per step against a CUDA-graph reference."""
