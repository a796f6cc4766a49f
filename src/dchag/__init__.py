"""dchag: many-channel vision foundation models with Distributed Cross-Channel Hierarchical Aggregation."""

__version__ = "0.1.0"
