"""The OpenAI-compatible HTTP API: the routes (`api_router.py`, HTTP only), the request and
response shapes with speccascade's extension fields (`protocol.py`)."""
