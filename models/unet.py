"""The epsilon network: a small DDPM U-Net, held as a *wide* ensemble of n members.

All n members live in one module: their channels are folded member by member into the
channel axis and every convolution is grouped (groups = n), so member i only ever sees its
own channels. Per-member GroupNorm is GroupNorm(groups * n, n * C) over that layout, and
skip concatenation interleaves per member. The n = 1 case *is* the plain single-member
U-Net, and ``member(i)`` slices one member out as such a module.

Parameters are stored with a leading member axis, e.g. a convolution weight is
(n, C_out, C_in, k, k), like torch.func.stack_module_state would stack them.

Besides ``forward``, every block has ``jvp``: a forward-mode derivative with respect to the
network input, for m tangent directions at once carried as extra batch rows (row j*B + b is
tangent j of sample b). The primal is computed once; linear layers run the tangents through
the same kernels, nonlinear ones use their closed-form derivatives. This is what makes the
synthetic-ablation Jacobian cost about (m + 1) forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of one member (all members share it)."""

    image_channels: int = 1
    image_size: int = 8
    base_channels: int = 16
    channel_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    norm_groups: int = 8
    heads: int = 1

    def __post_init__(self) -> None:
        down = 2 ** (len(self.channel_mults) - 1)
        if self.image_size % down:
            raise ValueError(
                f"image size {self.image_size} is not divisible by {down} "
                f"({len(self.channel_mults)} resolution levels)"
            )
        for m in self.channel_mults:
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError("every level's channel count must divide by norm_groups")

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> UNetConfig:
        d = dict(d)
        d["channel_mults"] = tuple(d["channel_mults"])  # type: ignore[arg-type]
        d["attn_resolutions"] = tuple(d["attn_resolutions"])  # type: ignore[arg-type]
        return cls(**d)  # type: ignore[arg-type]


def _uniform(shape: tuple[int, ...], bound: float, g: torch.Generator) -> Tensor:
    return (torch.rand(shape, generator=g, dtype=torch.float32) * 2.0 - 1.0) * bound


def _as_rows(d: Tensor, B: int) -> Tensor:
    """Tangent rows (m*B, ...) -> (m, B, ...), so a primal (B, ...) broadcasts."""
    return d.reshape(-1, B, *d.shape[1:])


def silu_jvp(x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    """SiLU and its derivative s(x)(1 + x(1 - s(x))). x: (B, ...), dx: (m*B, ...)."""
    s = torch.sigmoid(x)
    y = x * s
    dy = _as_rows(dx, x.shape[0]) * (s * (1.0 + x * (1.0 - s)))
    return y, dy.reshape(dx.shape)


_THIN = 4
"""Grouped convolutions with fewer channels than this per group run channels-last."""


class WConv(nn.Module):
    """n grouped 2-D convolutions. weight: (n, C_out, C_in, k, k), bias: (n, C_out).

    Input (B, n*C_in, H, W) (one slice per member) or (B, C_in, H, W), fed to every member.
    Output (B, n*C_out, H', W').
    """

    def __init__(
        self, n: int, c_in: int, c_out: int, k: int, stride: int, g: torch.Generator
    ) -> None:
        super().__init__()
        self.n, self.c_in, self.c_out, self.stride, self.pad = n, c_in, c_out, stride, k // 2
        bound = 1.0 / math.sqrt(c_in * k * k)
        self.weight = nn.Parameter(_uniform((n, c_out, c_in, k, k), bound, g))
        self.bias = nn.Parameter(_uniform((n, c_out), bound, g))

    def _conv(self, x: Tensor, bias: Tensor | None) -> Tensor:
        w = self.weight.reshape(self.n * self.c_out, *self.weight.shape[2:])
        groups = 1 if x.shape[1] == self.c_in else self.n
        if groups > 1 and min(self.c_in, self.c_out) < _THIN:
            # oneDNN's grouped kernels for NCHW are very slow when a group has only a
            # channel or two (the image in / out convolutions, mostly their backward); its
            # channels-last kernels are not. Same convolution, other memory layout.
            x = x.contiguous(memory_format=torch.channels_last)
            y = F.conv2d(x, w, bias, stride=self.stride, padding=self.pad, groups=groups)
            return y.contiguous()
        if groups > 1 and self.weight.shape[-1] == 1 and self.stride == 1:
            return self._pointwise(x, bias)
        return F.conv2d(x, w, bias, stride=self.stride, padding=self.pad, groups=groups)

    def _pointwise(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """The grouped 1x1 convolution as one batched matrix product over the members.

        Member i's output is W_i (C_out, C_in) @ its input (C_in, B*H*W): n products with
        B*H*W columns each. oneDNN's grouped 1x1 kernels (the backward above all) are several
        times slower at these sizes than moving the member axis first and back.
        """
        B, _, H, W = x.shape
        n, c_in, c_out = self.n, self.c_in, self.c_out
        xm = x.reshape(B, n, c_in, H * W).permute(1, 2, 0, 3).reshape(n, c_in, B * H * W)
        w = self.weight.reshape(n, c_out, c_in)
        y = torch.bmm(w, xm) if bias is None else torch.baddbmm(bias.reshape(n, c_out, 1), w, xm)
        return y.reshape(n, c_out, B, H * W).permute(2, 0, 1, 3).reshape(B, n * c_out, H, W)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv(x, self.bias.reshape(-1))

    def jvp(self, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward(x), self._conv(dx, None)


class WLinear(nn.Module):
    """n linear maps. weight: (n, D_out, D_in); (B, n, D_in) -> (B, n, D_out)."""

    def __init__(self, n: int, d_in: int, d_out: int, g: torch.Generator) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)
        self.weight = nn.Parameter(_uniform((n, d_out, d_in), bound, g))
        self.bias = nn.Parameter(_uniform((n, d_out), bound, g))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bni,noi->bno", x, self.weight) + self.bias


class WGroupNorm(nn.Module):
    """Per-member GroupNorm: GroupNorm(groups * n, n * C). weight, bias: (n, C)."""

    def __init__(self, n: int, groups: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.G, self.eps = n * groups, eps
        self.weight = nn.Parameter(torch.ones(n, channels))
        self.bias = nn.Parameter(torch.zeros(n, channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.G, self.weight.reshape(-1), self.bias.reshape(-1), self.eps)

    def jvp(self, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        """d xhat = (dx - mean(dx) - xhat * mean(xhat dx)) / sigma, per group."""
        B, Ch = x.shape[:2]
        xg = x.reshape(B, self.G, -1)
        xc = xg - xg.mean(-1, keepdim=True)
        rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + self.eps)  # (B, G, 1)
        xhat = xc * rstd  # (B, G, L)
        y = (xhat.reshape(x.shape) * self.weight.reshape(1, Ch, 1, 1)
             + self.bias.reshape(1, Ch, 1, 1))
        L = xg.shape[-1]
        dg = dx.reshape(-1, B, self.G, L)  # (m, B, G, L)
        mean_d = dg.mean(-1, keepdim=True)  # (m, B, G, 1)
        mean_dx = (dg * xhat).mean(-1, keepdim=True)  # (m, B, G, 1)
        # dy = (dg - mean_d - xhat * mean_dx) * rstd * gamma, with rstd * gamma folded into
        # one per-channel multiplier s.
        cpg = Ch // self.G
        s = rstd[..., None] * self.weight.reshape(1, self.G, cpg, 1)  # (B, G, C/G, 1)
        d5 = dg.reshape(-1, B, self.G, cpg, L // cpg)
        xs = xhat.reshape(B, self.G, cpg, L // cpg) * s
        dy = torch.addcmul(d5 * s - mean_d[..., None] * s, xs, mean_dx[..., None], value=-1.0)
        return y, dy.reshape(dx.shape)


def cat_members(a: Tensor, b: Tensor, n: int) -> Tensor:
    """Skip concatenation per member: (B, n*Ca, H, W), (B, n*Cb, H, W) -> (B, n*(Ca+Cb), H, W)."""
    B, _, H, W = a.shape
    out = torch.cat([a.reshape(B, n, -1, H, W), b.reshape(B, n, -1, H, W)], dim=2)
    return out.reshape(B, -1, H, W)


def _required(emb: Tensor | None) -> Tensor:
    if emb is None:
        raise ValueError("a ResBlock needs its time-embedding term (WideUNet.emb_terms)")
    return emb


class ResBlock(nn.Module):
    """GN -> SiLU -> conv -> + time embedding -> GN -> SiLU -> conv, plus a (1x1) skip."""

    def __init__(
        self, n: int, c_in: int, c_out: int, emb_dim: int, groups: int, g: torch.Generator
    ) -> None:
        super().__init__()
        self.n, self.c_out = n, c_out
        self.norm1 = WGroupNorm(n, groups, c_in)
        self.conv1 = WConv(n, c_in, c_out, 3, 1, g)
        self.emb = WLinear(n, emb_dim, c_out, g)
        self.norm2 = WGroupNorm(n, groups, c_out)
        self.conv2 = WConv(n, c_out, c_out, 3, 1, g)
        self.skip = WConv(n, c_in, c_out, 1, 1, g) if c_in != c_out else None

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        """emb: this block's time-embedding term (B, n*C_out, 1, 1), see WideUNet.emb_terms
        (optional only in the signature every block shares)."""
        h = self.conv1(F.silu(self.norm1(x))) + _required(emb)
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h

    def jvp(self, x: Tensor, dx: Tensor, emb: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h, dh = self.norm1.jvp(x, dx)
        h, dh = silu_jvp(h, dh)
        h, dh = self.conv1.jvp(h, dh)
        h = h + _required(emb)  # the time embedding does not depend on x: no tangent
        h, dh = self.norm2.jvp(h, dh)
        h, dh = silu_jvp(h, dh)
        h, dh = self.conv2.jvp(h, dh)
        if self.skip is None:
            return x + h, dx + dh
        s, ds = self.skip.jvp(x, dx)
        return s + h, ds + dh


class AttnBlock(nn.Module):
    """Per-member multi-head self-attention over pixels, with a residual connection."""

    def __init__(self, n: int, c: int, groups: int, heads: int, g: torch.Generator) -> None:
        super().__init__()
        if c % heads:
            raise ValueError(f"{c} channels do not split into {heads} heads")
        self.n, self.c, self.heads = n, c, heads
        self.norm = WGroupNorm(n, groups, c)
        self.qkv = WConv(n, c, 3 * c, 1, 1, g)
        self.proj = WConv(n, c, c, 1, 1, g)

    def _split(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(R, n*3C, H, W) -> q, k, v each (R, n, heads, C/heads, H*W)."""
        R, _, H, W = qkv.shape
        t = qkv.reshape(R, self.n, 3, self.heads, self.c // self.heads, H * W)
        return t[:, :, 0], t[:, :, 1], t[:, :, 2]

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        B, _, H, W = x.shape
        q, k, v = self._split(self.qkv(self.norm(x)))
        scale = (self.c // self.heads) ** -0.5
        a = torch.softmax(torch.einsum("bnhdq,bnhdk->bnhqk", q, k) * scale, dim=-1)
        o = torch.einsum("bnhqk,bnhdk->bnhdq", a, v).reshape(B, -1, H, W)
        return x + self.proj(o)

    def jvp(self, x: Tensor, dx: Tensor, emb: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B, _, H, W = x.shape
        h, dh = self.norm.jvp(x, dx)
        qkv, dqkv = self.qkv.jvp(h, dh)
        q, k, v = self._split(qkv)
        dq, dk, dv = (_as_rows(t, B) for t in self._split(dqkv))  # (m, B, n, h, d, L)
        scale = (self.c // self.heads) ** -0.5
        a = torch.softmax(torch.einsum("bnhdq,bnhdk->bnhqk", q, k) * scale, dim=-1)
        ds = (
            torch.einsum("mbnhdq,bnhdk->mbnhqk", dq, k) + torch.einsum("bnhdq,mbnhdk->mbnhqk", q, dk)
        ) * scale
        da = a * (ds - (a * ds).sum(-1, keepdim=True))
        o = torch.einsum("bnhqk,bnhdk->bnhdq", a, v).reshape(B, -1, H, W)
        do = torch.einsum("mbnhqk,bnhdk->mbnhdq", da, v) + torch.einsum(
            "bnhqk,mbnhdk->mbnhdq", a, dv
        )
        p, dp = self.proj.jvp(o, do.reshape(-1, *o.shape[1:]))
        return x + p, dx + dp


class Down(nn.Module):
    """Stride-2 3x3 convolution (halves H and W)."""

    def __init__(self, n: int, c: int, g: torch.Generator) -> None:
        super().__init__()
        self.conv = WConv(n, c, c, 3, 2, g)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(x)

    def jvp(self, x: Tensor, dx: Tensor, emb: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.conv.jvp(x, dx)


class Up(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    def __init__(self, n: int, c: int, g: torch.Generator) -> None:
        super().__init__()
        self.conv = WConv(n, c, c, 3, 1, g)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(upsample2(x))

    def jvp(self, x: Tensor, dx: Tensor, emb: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.conv.jvp(upsample2(x), upsample2(dx))


def upsample2(x: Tensor) -> Tensor:
    """Nearest-neighbour x2 upsampling, (B, C, H, W) -> (B, C, 2H, 2W).

    At small resolutions this is one matrix product with the 0/1 upsampling matrix: every
    output is 1 * (its source pixel) + 0 * (the others), so it equals F.interpolate, and its
    backward sums each 2x2 block. CPU F.interpolate (and its backward) is several times
    slower there: its loops are built for large images, not for many tiny channels.
    """
    B, C, H, W = x.shape
    if H * W > 64:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    rows = torch.arange(2 * H, device=x.device) // 2
    cols = torch.arange(2 * W, device=x.device) // 2
    src = (rows[:, None] * W + cols[None, :]).reshape(1, -1)  # (1, 4HW): source pixel
    up = (torch.arange(H * W, device=x.device)[:, None] == src).to(x.dtype)  # (HW, 4HW)
    return (x.reshape(B * C, H * W) @ up).reshape(B, C, 2 * H, 2 * W)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding (Vaswani et al., as in Ho et al.). t: (...) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.to(torch.float32)[..., None] * freqs
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


Block = ResBlock | AttnBlock | Down | Up


def _blocks(blocks: nn.ModuleList) -> Iterator[Block]:
    """The blocks of a WideUNet stage, typed (nn.ModuleList yields plain Modules)."""
    for blk in blocks:
        assert isinstance(blk, ResBlock | AttnBlock | Down | Up)
        yield blk


class WideUNet(nn.Module):
    """n member U-Nets eps_1..eps_n evaluated together.

    forward(x_t, t) -> eps: (n, B, C, H, W), member i's noise prediction eps_i(x_t, t).
    x_t is (B, C, H, W) (the same input to every member, as in sampling) or
    (B, n*C, H, W) (one input per member, as in training); t is (B,) or (B, n).
    """

    def __init__(self, config: UNetConfig, n: int, generator: torch.Generator) -> None:
        super().__init__()
        self.config, self.n = config, n
        g, cfg = generator, config
        base, groups = cfg.base_channels, cfg.norm_groups
        emb_dim = 4 * base
        self.emb1 = WLinear(n, base, emb_dim, g)
        self.emb2 = WLinear(n, emb_dim, emb_dim, g)
        self.conv_in = WConv(n, cfg.image_channels, base, 3, 1, g)

        self.down = nn.ModuleList()
        skips = [base]
        ch, res = base, cfg.image_size
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(ResBlock(n, ch, base * mult, emb_dim, groups, g))
                ch = base * mult
                if res in cfg.attn_resolutions:
                    self.down.append(AttnBlock(n, ch, groups, cfg.heads, g))
                skips.append(ch)
            if level + 1 < len(cfg.channel_mults):
                self.down.append(Down(n, ch, g))
                res //= 2
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(n, ch, ch, emb_dim, groups, g)])
        if cfg.attn_resolutions:
            self.mid.append(AttnBlock(n, ch, groups, cfg.heads, g))
        self.mid.append(ResBlock(n, ch, ch, emb_dim, groups, g))

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(ResBlock(n, ch + skips.pop(), base * mult, emb_dim, groups, g))
                ch = base * mult
                if res in cfg.attn_resolutions:
                    self.up.append(AttnBlock(n, ch, groups, cfg.heads, g))
            if level > 0:
                self.up.append(Up(n, ch, g))
                res *= 2
        self.norm_out = WGroupNorm(n, groups, ch)
        self.conv_out = WConv(n, ch, cfg.image_channels, 3, 1, g)

    def time_embedding(self, t: Tensor, batch: int) -> Tensor:
        """t: scalar, (B,) or (B, n) -> (B, n, 4 * base)."""
        t = t.reshape(-1, 1) if t.dim() <= 1 else t
        t = t.expand(batch, self.n)
        e = timestep_embedding(t, self.config.base_channels).to(self.conv_in.weight.dtype)
        return self.emb2(F.silu(self.emb1(e)))

    def emb_terms(self, emb: Tensor) -> list[Tensor | None]:
        """Per block of down, mid, up (in that order): a ResBlock's time-embedding term
        emb(silu(emb)) as (B, n*C_out, 1, 1), None for the other blocks.

        All ResBlocks' projections run as one batched product (their weights concatenated),
        not one small product each. emb: (B, n, 4 * base) from time_embedding.
        """
        blocks = [*self.down, *self.mid, *self.up]
        res = [blk for blk in blocks if isinstance(blk, ResBlock)]
        w = torch.cat([blk.emb.weight for blk in res], dim=1)  # (n, sum C_out, D)
        b = torch.cat([blk.emb.bias for blk in res], dim=1)
        out = torch.einsum("bni,noi->bno", F.silu(emb), w) + b  # (B, n, sum C_out)
        parts = iter(out.split([blk.c_out for blk in res], dim=2))
        B = emb.shape[0]
        return [next(parts).reshape(B, -1, 1, 1) if isinstance(blk, ResBlock) else None
                for blk in blocks]

    def _out(self, h: Tensor) -> Tensor:
        B, _, H, W = h.shape
        return h.reshape(B, self.n, -1, H, W).transpose(0, 1)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        terms = iter(self.emb_terms(self.time_embedding(t, x_t.shape[0])))
        h = self.conv_in(x_t)
        hs = [h]
        for blk in self.down:
            h = blk(h, next(terms))
            if isinstance(blk, AttnBlock):
                hs[-1] = h  # attention refines the skip its ResBlock just pushed
            else:
                hs.append(h)
        for blk in self.mid:
            h = blk(h, next(terms))
        for blk in self.up:
            if isinstance(blk, ResBlock):
                h = cat_members(h, hs.pop(), self.n)
            h = blk(h, next(terms))
        h = self.conv_out(F.silu(self.norm_out(h)))
        return self._out(h)

    def jvp(self, x_t: Tensor, dx_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Forward-mode derivative with respect to the input, m tangents at once.

        Args:
            x_t: (B, C, H, W) input shared by all members; dx_t: (m, B, C, H, W) tangents.
            t: scalar or (B,) timesteps.
        Returns:
            eps: (n, B, C, H, W) and d_eps: (m, n, B, C, H, W), d_eps[j, i] = (d eps_i / d x) dx_j.
        """
        B = x_t.shape[0]
        m = dx_t.shape[0]
        terms = iter(self.emb_terms(self.time_embedding(t, B)))
        h, dh = self.conv_in.jvp(x_t, dx_t.reshape(m * B, *dx_t.shape[2:]))
        hs = [(h, dh)]
        for blk in _blocks(self.down):
            h, dh = blk.jvp(h, dh, next(terms))
            if isinstance(blk, AttnBlock):
                hs[-1] = (h, dh)
            else:
                hs.append((h, dh))
        for blk in _blocks(self.mid):
            h, dh = blk.jvp(h, dh, next(terms))
        for blk in _blocks(self.up):
            if isinstance(blk, ResBlock):
                s, ds = hs.pop()
                h, dh = cat_members(h, s, self.n), cat_members(dh, ds, self.n)
            h, dh = blk.jvp(h, dh, next(terms))
        h, dh = self.norm_out.jvp(h, dh)
        h, dh = silu_jvp(h, dh)
        h, dh = self.conv_out.jvp(h, dh)
        H, W = dh.shape[-2:]
        d_eps = dh.reshape(m, B, self.n, -1, H, W).transpose(1, 2)
        return self._out(h), d_eps

    def member(self, i: int) -> WideUNet:
        """Member i as its own single-member (n = 1) network (a copy of its parameters)."""
        single = WideUNet(self.config, 1, torch.Generator().manual_seed(0))
        single.load_state_dict(member_state(self.state_dict(), i))
        return single.to(device=self.conv_in.weight.device, dtype=self.conv_in.weight.dtype)


def member_state(state: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    """Slice member i out of a wide state dict (every tensor has a leading member axis)."""
    return {k: v[i : i + 1].clone() for k, v in state.items()}


def stack_states(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate single-member state dicts into one wide state dict."""
    return {k: torch.cat([s[k] for s in states], dim=0) for k in states[0]}


def replace_members(net: WideUNet, members: list[int], sub: WideUNet) -> WideUNet:
    """A copy of ``net`` whose members ``members`` are the members of ``sub`` (in order); every
    other member's parameters are copied unchanged. sub: a network of len(members) members of
    the same configuration."""
    if sub.n != len(members) or sub.config != net.config:
        raise ValueError(f"need a network of {len(members)} members of the same configuration")
    state = {key: value.detach().clone() for key, value in net.state_dict().items()}
    index = torch.tensor(members, dtype=torch.long)
    for key, value in sub.state_dict().items():
        state[key][index] = value.to(state[key])
    out = WideUNet(net.config, net.n, torch.Generator().manual_seed(0))
    out.load_state_dict(state)
    return out.to(device=net.conv_in.weight.device, dtype=net.conv_in.weight.dtype)


def num_parameters(net: WideUNet) -> int:
    """Parameters per member."""
    return sum(p.numel() for p in net.parameters()) // net.n
