"""`speccascade bench serve`: the served system against the in-process engine."""
