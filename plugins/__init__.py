"""What runs inside the vLLM engine: the decode-time defenses (PoE, ADS).

Public math lives in :mod:`distillgame.plugins.mixing`; the engine-side
processor in :mod:`distillgame.plugins.processor`; the float64 oracle that tests
and benchmarks compare against in :mod:`distillgame.plugins.reference`. This
package imports nothing from ``server`` or ``clients``.
"""
