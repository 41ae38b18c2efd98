"""The serving core on Ray Serve, protocol-free: the router core (admission, sessions, streaming
over the tiers), the drafter and expert tiers with their batching and session caches, the tier
clients the router's loop calls, and the session-affinity request router. The protocol front-ends
(`speccascade.frontends`) are thin adapters over `RouterCore`; `speccascade.app` wires it all
into one Serve application."""
