"""Deferral-rate autoscaling of the drafter and expert tiers (see policy.py)."""
