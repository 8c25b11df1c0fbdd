"""`levante chat`: a Textual terminal app over any OpenAI-compatible server (levante's own, in-process, by default)."""
