"""DeepSeek-V4's rotary embedding: interleaved pairs on the trailing rope_head_dim channels of a head; plain rope
(rope_theta) on window-only layers, compress_rope_theta with optional yarn on compressed layers (the attention's
factor fixed at 1, as DeepSeek's reference and transformers 5.24 do). The output's inverse rotation is the same
rotation with -sin."""
import math

import torch


def inv_freq(dim: int, theta: float, yarn: dict | None = None) -> torch.Tensor:
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return yarn_scaled(freqs, dim, theta, yarn) if yarn else freqs


def yarn_scaled(freqs: torch.Tensor, dim: int, theta: float, yarn: dict) -> torch.Tensor:
    """YaRN (arXiv 2309.00071): interpolate the low frequencies by `factor`, keep the high ones, ramp between."""
    factor, old_len = yarn["factor"], yarn["original_max_position_embeddings"]
    low = math.floor(correction_dim(yarn.get("beta_fast") or 32, dim, theta, old_len))
    high = math.ceil(correction_dim(yarn.get("beta_slow") or 1, dim, theta, old_len))
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    return freqs / factor * ramp + freqs * (1 - ramp)


def correction_dim(rotations: float, dim: int, theta: float, max_positions: int) -> float:
    return dim * math.log(max_positions / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def cos_sin(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    angles = positions.float()[:, None] * freqs.to(positions.device)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, ..., D]: rotate the pairs of its last 2 * cos.shape[-1] channels by each row's angles (cos/sin [T, R/2]),
    in fp32; the leading channels pass through."""
    rope_dim = 2 * cos.shape[-1]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.view(shape), sin.view(shape)
    even, odd = x[..., -rope_dim:].float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)
    return torch.cat([x[..., :-rope_dim], rotated.to(x.dtype)], -1)
