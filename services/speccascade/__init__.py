"""speccascade: speculative cascades of language models, served."""
