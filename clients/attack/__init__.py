"""The attack harness: what a distiller does with an OpenAI-compatible endpoint.

``collect`` queries any endpoint for a task's prompts and stores the traces,
``distill`` fine-tunes a student on them (passive: uniform weights; adaptive:
the exponential tilt of Theorem 3.1 with the gradient value of eq. 3),
``evaluation`` scores teacher and students, and ``table`` runs the whole
protocol of Table 1. The harness talks HTTP only; it never imports the server
or the engine, exactly like an outside attacker.
"""
