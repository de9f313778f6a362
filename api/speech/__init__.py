"""POST /v1/audio/speech: protocol (SpeechRequest), router (route) and serving (the handler)."""
