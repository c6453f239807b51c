"""The CPU-scale model zoo: its build recipe (``build``) and the built checkpoints.

``teacher/``, ``proxy/`` and ``student-base/`` next to this file are Hugging Face
folders that share one digit-split tokenizer; ``distillgame zoo build``
rebuilds them from scratch with fixed seeds.
"""
