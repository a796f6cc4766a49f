"""`dchag plan`: per-GPU memory and predicted throughput of every layout, before booking a machine.

Each (variant, layout) is traced, not estimated: one rank's real training step runs on fake tensors
(no memory, no arithmetic) with torch's fake process group standing in for its peers, and torch's
MemTracker, FlopCounterMode and our CommBytesMode record what that rank would hold, compute and send.
"""
