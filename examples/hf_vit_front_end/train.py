"""A D-CHAG front end on a Hugging Face ViT, its channels spread over the ranks of torchrun.

    torchrun --standalone --nproc-per-node 2 examples/hf_vit_front_end/train.py

The ranks form the front end's tensor-parallel group (tp = number of ranks): each tokenizes and
aggregates only its block of the 24 bands of a synthetic hyperspectral cube, one all-gather joins the
partial tokens, and every rank gets the same patch tokens. The ViT (random init, no download) is
replicated: with the same inputs on every rank its gradients are the same, so it needs no communication.
The task: predict every patch's mean spectrum from the ViT's patch tokens. Needs `pip install "dchag[hf]"`.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import reduce
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from transformers import ViTConfig, ViTModel

import dchag
from dchag.adapters.hf_vit import use_front_end
from dchag.data.channels import band_names
from dchag.data.synthetic_hyperspectral import SyntheticHyperspectral


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bands", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    dist.init_process_group("gloo")  # CPU; on GPUs use "nccl" and move the modules and batches to the GPU
    rank, tp = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
    torch.manual_seed(0)  # the same initial weights on every rank

    channels = band_names(args.bands)  # b400.0 ... b900.0
    img, patch, width = 32, 4, 64
    front = dchag.FrontEnd(channels, img_size=img, patch_size=patch, embed_dim=width)  # D-CHAG-L, fused
    vit = ViTModel(
        ViTConfig(
            hidden_size=width,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=2 * width,
            image_size=img,
            patch_size=patch,
            num_channels=len(channels),
        ),
        add_pooling_layer=False,
    )
    head = nn.Linear(width, len(channels))  # each patch token -> that patch's mean spectrum

    parallel = dchag.parallelize_front_end(front, mesh)  # this rank's part of the front end
    use_front_end(vit, parallel)  # in place of vit.embeddings.patch_embeddings
    print(
        f"rank {rank}: tokenizes bands {parallel.channel_slice.start}:{parallel.channel_slice.stop} "
        f"({parallel.input_channels[0]} .. {parallel.input_channels[-1]}) of {len(channels)}",
        flush=True,
    )
    params = [*vit.parameters(), *head.parameters()]  # the ViT's include this rank's front-end shards
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    data = SyntheticHyperspectral(channels, (img, img), seed=0)
    for step in range(args.steps):
        x = data.batch(list(range(step * args.batch_size, (step + 1) * args.batch_size)))["x"]  # [B, C, H, W]
        target = reduce(x, "b c (h p1) (w p2) -> b (h w) c", "mean", p1=patch, p2=patch)  # [B, L, C]
        tokens = vit(pixel_values=x[:, parallel.channel_slice]).last_hidden_state[:, 1:]  # [B, L, D], no CLS
        loss = F.mse_loss(head(tokens), target)
        optimizer.zero_grad()
        loss.backward()
        parallel.finish_gradients()  # sum the partial gradients of the front end's shared parameters
        optimizer.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)

    # the replicated part stayed identical on every rank without any communication
    backbone = [p for n, p in vit.named_parameters() if ".front_end." not in n] + list(head.parameters())
    checksum = torch.stack([p.detach().double().sum() for p in backbone])
    everyone = [torch.empty_like(checksum) for _ in range(tp)]
    dist.all_gather(everyone, checksum)
    identical = all(torch.equal(everyone[0], c) for c in everyone)
    if rank == 0:
        print(f"replicated ViT and head identical on all {tp} ranks: {identical}")
    dist.destroy_process_group()
    if not identical or not torch.isfinite(loss):
        raise SystemExit("the replicated weights diverged or the loss is not finite")


if __name__ == "__main__":
    main()
