"""Measurement: overhead, the reference approach, calibration, the zoo."""
