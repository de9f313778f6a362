"""POST /v1/chat/completions with speech: router (routes) and serving (the handler)."""
