"""Single-device model: no process groups anywhere; distribution is applied from `dchag.parallel`."""

from dchag.model.model import ChannelViT, ModelOutput, build_model

__all__ = ["ChannelViT", "ModelOutput", "build_model"]
