"""Tests for models.unet: the wide ensemble equals its members, and its hand-written JVP."""

from __future__ import annotations

import pytest
import torch

from models.unet import UNetConfig, WideUNet, member_state, num_parameters, stack_states

PLAIN = UNetConfig(image_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2),
                   norm_groups=4)
ATTN = UNetConfig(image_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2),
                  attn_resolutions=(8, 4), norm_groups=4, heads=2)
RGB = UNetConfig(image_channels=3, image_size=8, base_channels=8, channel_mults=(1, 2),
                 num_res_blocks=2, attn_resolutions=(4,), norm_groups=4)
CONFIGS = {"plain": PLAIN, "attn": ATTN, "rgb2res": RGB}


def perturbed(config: UNetConfig, n: int, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> WideUNet:
    """A wide net whose GroupNorm affine parameters are not the trivial (1, 0) init, so that
    a mix-up of members there would show."""
    net = WideUNet(config, n, torch.Generator().manual_seed(seed)).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(dtype))
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shared_input_equals_member_loop(name: str) -> None:
    cfg = CONFIGS[name]
    n, B = 5, 3
    net = perturbed(cfg, n)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, cfg.image_channels, 8, 8, generator=g)
    t = torch.tensor([0, 7, 19])
    out = net(x, t)
    assert out.shape == (n, B, cfg.image_channels, 8, 8)
    for i in range(n):
        single = net.member(i)
        assert single.n == 1
        ref = single(x, t)
        assert ref.shape == (1, B, cfg.image_channels, 8, 8)
        torch.testing.assert_close(out[i], ref[0], atol=1e-5, rtol=1e-5)
    # members really differ (otherwise the comparison above proves little)
    assert (out[0] - out[1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_per_member_input_equals_member_loop(name: str) -> None:
    cfg = CONFIGS[name]
    C = cfg.image_channels
    n, B = 4, 3
    net = perturbed(cfg, n, seed=3)
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(n, B, C, 8, 8, generator=g)
    ts = torch.randint(20, (B, n), generator=g)
    wide_in = xs.transpose(0, 1).reshape(B, n * C, 8, 8)  # channels member by member
    out = net(wide_in, ts)
    for i in range(n):
        ref = net.member(i)(xs[i], ts[:, i])[0]
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)
        # and member i ignores the other members' inputs entirely
        torch.testing.assert_close(out[i], net.member(i)(wide_in[:, i * C:(i + 1) * C],
                                                          ts[:, i])[0], atol=1e-5, rtol=1e-5)


def test_member_input_isolation() -> None:
    """Changing member j's input slice changes member j's output only."""
    n, B = 4, 2
    net = perturbed(ATTN, n)
    x = torch.randn(B, n, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((B, n), 5)
    base = net(x, t)
    x2 = x.clone()
    x2[:, 2] += 1.0
    out = net(x2, t)
    for i in range(n):
        changed = not torch.equal(out[i], base[i])
        assert changed == (i == 2)


def test_scalar_and_vector_t_agree() -> None:
    net = perturbed(PLAIN, 3)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a = net(x, torch.tensor(9))
    b = net(x, torch.tensor([9]))
    c = net(x, torch.tensor([9, 9]))
    d = net(x, torch.full((2, 3), 9))
    for o in (b, c, d):
        torch.testing.assert_close(a, o, atol=1e-6, rtol=1e-6)


def test_member_state_roundtrip() -> None:
    net = perturbed(ATTN, 4)
    states = [member_state(net.state_dict(), i) for i in range(4)]
    for s in states:
        assert all(v.shape[0] == 1 for v in s.values())
    stacked = stack_states(states)
    for k, v in net.state_dict().items():
        assert torch.equal(stacked[k], v)
    # a sub-ensemble of members (3, 1) behaves as those members
    sub = WideUNet(ATTN, 2, torch.Generator().manual_seed(9))
    sub.load_state_dict(stack_states([states[3], states[1]]))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 4])
    full, part = net(x, t), sub(x, t)
    torch.testing.assert_close(part[0], full[3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part[1], full[1], atol=1e-5, rtol=1e-5)


def test_num_parameters_per_member() -> None:
    wide = WideUNet(PLAIN, 6, torch.Generator().manual_seed(0))
    single = WideUNet(PLAIN, 1, torch.Generator().manual_seed(0))
    assert num_parameters(wide) == num_parameters(single)
    assert num_parameters(wide) == sum(p.numel() for p in single.parameters())


def test_config_validation_and_roundtrip() -> None:
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(image_size=7, channel_mults=(1, 2))
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(base_channels=6, norm_groups=4)
    assert UNetConfig.from_dict(ATTN.to_dict()) == ATTN


@pytest.mark.parametrize("name", list(CONFIGS))
def test_jvp_matches_torch_func(name: str) -> None:
    cfg = CONFIGS[name]
    C = cfg.image_channels
    n, B, m = 3, 2, 4
    net = perturbed(cfg, n, seed=5, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, C, 8, 8, generator=g, dtype=torch.float64)
    dx = torch.randn(m, B, C, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([2, 17])
    eps, d_eps = net.jvp(x, dx, t)
    assert eps.shape == (n, B, C, 8, 8)
    assert d_eps.shape == (m, n, B, C, 8, 8)
    torch.testing.assert_close(eps, net(x, t), atol=1e-12, rtol=1e-12)
    for j in range(m):
        primal, tangent = torch.func.jvp(lambda z: net(z, t), (x,), (dx[j],))[:2]
        torch.testing.assert_close(eps, primal, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(d_eps[j], tangent, atol=1e-10, rtol=1e-10)
        assert tangent.abs().max() > 1e-3


def test_jvp_is_linear_in_the_tangent() -> None:
    net = perturbed(PLAIN, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    dx = torch.randn(2, 2, 1, 8, 8, generator=g, dtype=torch.float64)
    both = torch.stack([dx[0], dx[1], 2.0 * dx[0] - 3.0 * dx[1]])
    _, d = net.jvp(x, both, torch.tensor(11))
    torch.testing.assert_close(d[2], 2.0 * d[0] - 3.0 * d[1], atol=1e-12, rtol=1e-10)
