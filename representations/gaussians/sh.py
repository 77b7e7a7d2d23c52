"""Real spherical harmonics up to degree 3 (the basis and sign convention of 3D Gaussian
Splatting, so coefficients written to a .ply mean the same to splat viewers).

Colour = 0.5 + sum_k sh_k Y_k(d), d the unit direction from the camera to the Gaussian. With
degree 0 this is 0.5 + C0 f_dc (view-independent), the usual choice for score distillation.
"""

from __future__ import annotations

import torch
from torch import Tensor

C0 = 0.28209479177387814
C1 = 0.4886025119029199
C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658, 1.445305721320277, -0.5900435899266435)


def num_coefficients(degree: int) -> int:
    return (degree + 1) ** 2


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    return (rgb - 0.5) / C0


def sh0_to_rgb(sh0: Tensor) -> Tensor:
    return sh0 * C0 + 0.5


def eval_sh(degree: int, coeffs: Tensor, dirs: Tensor | None) -> Tensor:
    """coeffs (N, (degree+1)^2, 3), dirs (N, 3) unit (ignored for degree 0) -> (N, 3), plus 0.5."""
    out = C0 * coeffs[:, 0]
    if degree == 0:
        return out + 0.5
    x, y, z = dirs[:, 0:1], dirs[:, 1:2], dirs[:, 2:3]
    out = out - C1 * y * coeffs[:, 1] + C1 * z * coeffs[:, 2] - C1 * x * coeffs[:, 3]
    if degree > 1:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out = (
            out
            + C2[0] * xy * coeffs[:, 4]
            + C2[1] * yz * coeffs[:, 5]
            + C2[2] * (2 * zz - xx - yy) * coeffs[:, 6]
            + C2[3] * xz * coeffs[:, 7]
            + C2[4] * (xx - yy) * coeffs[:, 8]
        )
        if degree > 2:
            out = (
                out
                + C3[0] * y * (3 * xx - yy) * coeffs[:, 9]
                + C3[1] * xy * z * coeffs[:, 10]
                + C3[2] * y * (4 * zz - xx - yy) * coeffs[:, 11]
                + C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * coeffs[:, 12]
                + C3[4] * x * (4 * zz - xx - yy) * coeffs[:, 13]
                + C3[5] * z * (xx - yy) * coeffs[:, 14]
                + C3[6] * x * (xx - 3 * yy) * coeffs[:, 15]
            )
    return out + 0.5


class _InwardClamp(torch.autograd.Function):
    """Clamp to [0, 1]; gradients pass wherever descent moves the value back into range, so a
    colour that overshot is not stuck (a plain clamp would zero its gradient for good)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        keep = ((x >= 0) & (x <= 1)) | ((x < 0) & (g < 0)) | ((x > 1) & (g > 0))
        return g * keep


def clamp_colors(rgb: Tensor) -> Tensor:
    return _InwardClamp.apply(rgb)
