"""Measurement: parameter/FLOP summaries, memory, time, benchmark sweeps."""
