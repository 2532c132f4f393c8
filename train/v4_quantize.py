"""Trained DSpark stage weights back into the storage formats of a released DeepSeek-V4 checkpoint, the inverse of
engine/models/deepseek_v4/checkpoint.py's dequantizers:

- FP8: float8_e4m3fn with one scale per 128x128 block. An e8m0 scale is a power of two rounded up,
  2^ceil(log2(amax / 448)), so that no value clips (DeepSeek's V3.2 inference kernels round their ue8m0 scales up
  alike); a float32 scale (the FP8-expert checkpoints, Flash-Base) is amax / 448 itself. Values round to nearest even.
- MXFP4: e2m1 codes two per byte (the low nibble the even element), one e8m0 scale per 32 inputs,
  2^ceil(log2(amax / 6)); magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6} round to nearest, ties to the even code.

An all-zero block or group gets the smallest scale that keeps its zeros."""
import torch

from engine.models.deepseek_v4.checkpoint import E2M1_MAGNITUDES, FP8_BLOCK, MX_GROUP

FP8_MAX, FP4_MAX = 448.0, 6.0
E2M1_MIDPOINTS = torch.tensor([(a + b) / 2 for a, b in zip(E2M1_MAGNITUDES, E2M1_MAGNITUDES[1:])],
                              dtype=torch.float64)


def exponent_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest integer e with x <= 2^e (x > 0), exactly: frexp gives x = m * 2^k with m in [0.5, 1)."""
    mantissa, exponent = torch.frexp(x)
    return exponent - (mantissa == 0.5).long()


def e8m0(exponent: torch.Tensor) -> torch.Tensor:
    if exponent.min() < -127 or exponent.max() > 127:
        raise ValueError("a scale outside e8m0's range 2^-127..2^127")
    return (exponent + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def quantize_fp8_block(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (float8_e4m3fn [out, in], scales [ceil(out/128), ceil(in/128)] in scale_dtype: float8_e8m0fnu
    (or uint8, its raw bytes) for powers of two, else float32)."""
    rows, cols = w.shape
    blocks = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    padded = w.new_zeros(blocks[0] * FP8_BLOCK, blocks[1] * FP8_BLOCK, dtype=torch.float64)
    padded[:rows, :cols] = w.double()
    amax = padded.view(blocks[0], FP8_BLOCK, blocks[1], FP8_BLOCK).abs().amax(dim=(1, 3))
    if scale_dtype in (torch.float8_e8m0fnu, torch.uint8):
        exponent = exponent_at_least(amax.clamp_min(2.0 ** -100) / FP8_MAX)
        value, scale = torch.ldexp(torch.ones_like(amax), exponent), e8m0(exponent).view(scale_dtype)
    else:
        value = (amax.clamp_min(1e-30) / FP8_MAX).float().double()
        scale = value.to(scale_dtype)
    per_element = value.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    return (w.double() / per_element).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Values already within +-6 -> 4-bit codes (sign bit 3), nearest magnitude, ties to the even code."""
    magnitude = x.abs().clamp_max(FP4_MAX)
    code = torch.bucketize(magnitude, E2M1_MIDPOINTS, right=True)  # ties up ...
    code -= torch.isin(magnitude, E2M1_MIDPOINTS[0::2]).long()     # ... except onto an odd code
    return code + 8 * (x < 0).long()


def quantize_mxfp4(w: torch.Tensor, packed_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] (in a multiple of 32) -> (packed codes [out, in/2] viewed as packed_dtype, e8m0 scales
    [out, in/32])."""
    rows, cols = w.shape
    if cols % MX_GROUP:
        raise ValueError(f"MXFP4 needs a multiple of {MX_GROUP} inputs, got a [{rows}, {cols}] weight")
    groups = w.double().view(rows, cols // MX_GROUP, MX_GROUP)
    exponent = exponent_at_least(groups.abs().amax(-1).clamp_min(2.0 ** -100) / FP4_MAX)
    codes = e2m1_codes(groups / torch.ldexp(torch.ones_like(groups[..., 0]), exponent)[..., None]).view(rows, cols)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    return packed.view(packed_dtype), e8m0(exponent)
