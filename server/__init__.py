"""The OpenAI-compatible HTTP front end and its policy."""
