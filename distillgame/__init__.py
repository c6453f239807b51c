"""distillgame: a defended LLM inference server.

Subpackages follow the architecture:

- ``distillgame.plugins``: what runs inside the vLLM engine (the defense).
- ``distillgame.server``: the OpenAI-compatible HTTP front end and its policy.
- ``distillgame.clients``: what talks to an endpoint (SDK helpers, attack harness).
- ``distillgame.bench``: measurement.

The top-level modules here hold what all of them share: the embedded default
models (:mod:`distillgame.models`), the engine configuration
(:mod:`distillgame.engine`) and the command line (:mod:`distillgame.cli`).
"""

__version__ = "0.1.0"
