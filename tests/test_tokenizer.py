"""The stacked tokenizer is exactly a separate Conv2d per channel, and it looks channels up by name."""

import torch
import torch.nn.functional as F

from dchag.model.tokenizer import ChannelTokenizer


def test_batched_tokenizer_equals_one_conv_per_channel(rng):
    tok = ChannelTokenizer(vocab_size=7, dim=8, patch=4)
    with torch.no_grad():
        tok.bias.normal_(generator=rng)
    index = torch.tensor([5, 0, 3])
    x = torch.randn(2, 3, 8, 12, generator=rng)
    out = tok(x, index)  # [B, C, L, D]
    for c, v in enumerate(index.tolist()):
        conv = F.conv2d(x[:, c : c + 1], tok.weight[v][:, None], tok.bias[v], stride=4)  # [B, D, h, w]
        expected = conv.flatten(2).transpose(1, 2) + tok.channel_embed[v]
        torch.testing.assert_close(out[:, c], expected, rtol=1e-5, atol=1e-6)


def test_models_with_different_channel_subsets_share_embeddings_by_name():
    from conftest import small_config

    from dchag.model import build_model

    vocab = "model.vocabulary=[t2m, u10, v10, z_500, t_850]"
    a = build_model(small_config(vocab, "data.channels=[t2m, u10, v10]", "model.hierarchy.groups=1"))
    b = build_model(
        small_config(vocab, "data.channels=[z_500, u10]", "model.hierarchy.groups=1", "data.out_channels=[u10]")
    )
    assert a.front_end.tokenizer.weight.shape == b.front_end.tokenizer.weight.shape == (5, 32, 4, 4)
    assert a.front_end.channel_index.tolist() == [0, 1, 2]
    assert b.front_end.channel_index.tolist() == [3, 1]
    # load a's tokenizer into b: b's "u10" channel then uses a's "u10" weights
    b.front_end.tokenizer.load_state_dict(a.front_end.tokenizer.state_dict())
    x = torch.randn(1, 1, 16, 32)
    ta = a.front_end.tokenizer(x, torch.tensor([1]))
    tb = b.front_end.tokenizer(x, b.front_end.channel_index[1:])
    torch.testing.assert_close(ta, tb)
