"""Task losses and metrics."""

from dchag.tasks.forecast import lat_weighted_mse
from dchag.tasks.mae import mae_loss, mask_noise_for_step
from dchag.tasks.step import compute_loss

__all__ = ["lat_weighted_mse", "mae_loss", "mask_noise_for_step", "compute_loss"]
