"""dchag: many-channel vision foundation models with Distributed Cross-Channel Hierarchical Aggregation."""

__version__ = "0.1.0"

# The oldest torch with every API dchag uses; the newest of them is FSDP2's
# FSDPModule.set_force_sum_reduction_for_comms (gloo has no AVG reduction), new in torch 2.8.
MIN_TORCH = (2, 8)


def torch_too_old(version: str) -> str | None:
    """A one-line message when the torch `version` string is older than MIN_TORCH, else None."""
    import re

    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if numbers >= MIN_TORCH:
        return None
    need = ".".join(map(str, MIN_TORCH))
    return (
        f"dchag needs torch >= {need} (FSDP2's sum-only gradient reduction), but torch {version} is installed; "
        f"install a newer one first, e.g. pip install 'torch>={need}'"
    )


def require_torch() -> None:
    """Raise ImportError with that one line when the installed torch is too old."""
    import torch

    message = torch_too_old(torch.__version__)
    if message:
        raise ImportError(message)


def __getattr__(name: str):
    """`dchag.load`, `dchag.FrontEnd` and `dchag.parallelize_front_end` are imported on first use (PEP 562),
    so `import dchag` stays light: no torch, no data stack."""
    if name == "load":
        from dchag.use.trained import load

        return load
    if name == "FrontEnd":
        from dchag.use.front_end import FrontEnd

        return FrontEnd
    if name == "parallelize_front_end":
        from dchag.use.parallel_front_end import parallelize_front_end

        return parallelize_front_end
    raise AttributeError(f"module 'dchag' has no attribute {name!r}")
