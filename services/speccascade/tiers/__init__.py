"""Ray Serve deployments: drafter and expert tiers, and the router that runs the loop."""
