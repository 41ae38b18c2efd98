"""`speccascade bench tradeoff`: quality against latency of every rule and baseline on HumanEval."""
