"""OpenAI's Realtime API on `/v1/realtime` (issue 13); layout as vLLM's entrypoints/openai/<feature>/."""
