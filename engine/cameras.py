"""Camera model, ray generation and random view sampling: the one camera code every part uses.

Conventions (documented in README):
- World is right-handed and y-up (as glTF and OBJ). Azimuth 0 puts the camera on +z looking at
  the origin (the "front" view); positive azimuth turns toward +x; positive elevation is above.
- Camera frame is OpenGL's: x right, y up, the camera looks along -z.
- Angles in the public API are degrees; fovy is vertical field of view in degrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Cameras:
    """A batch of pinhole cameras looking at the origin (or near it when perturbed)."""

    c2w: Tensor  # (B, 4, 4) camera-to-world
    fovy: Tensor  # (B,) degrees
    elevation: Tensor  # (B,) degrees
    azimuth: Tensor  # (B,) degrees in [-180, 180)
    distance: Tensor  # (B,)

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    @property
    def position(self) -> Tensor:
        return self.c2w[:, :3, 3]

    def to(self, device) -> "Cameras":
        return Cameras(*(getattr(self, f).to(device) for f in ("c2w", "fovy", "elevation", "azimuth", "distance")))

    def __getitem__(self, index) -> "Cameras":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Cameras(self.c2w[index], self.fovy[index], self.elevation[index], self.azimuth[index], self.distance[index])

    @staticmethod
    def cat(items: list["Cameras"]) -> "Cameras":
        return Cameras(*(torch.cat([getattr(c, f) for c in items]) for f in ("c2w", "fovy", "elevation", "azimuth", "distance")))

    def focal(self, height: int) -> Tensor:
        """Focal length in pixels for an image of this height."""
        return 0.5 * height / torch.tan(torch.deg2rad(self.fovy) / 2)

    def w2c(self) -> Tensor:
        return torch.linalg.inv(self.c2w)

    def projection(self, aspect: float = 1.0, near: float = 0.1, far: float = 100.0) -> Tensor:
        """OpenGL clip-space projection (B, 4, 4)."""
        return perspective(self.fovy, aspect, near, far)

    def mvp(self, aspect: float = 1.0, near: float = 0.1, far: float = 100.0) -> Tensor:
        """World to clip space (B, 4, 4)."""
        return self.projection(aspect, near, far) @ self.w2c()


def perspective(fovy_deg: Tensor, aspect: float, near: float, far: float) -> Tensor:
    f = 1.0 / torch.tan(torch.deg2rad(fovy_deg) / 2)
    proj = torch.zeros(fovy_deg.shape[0], 4, 4, dtype=fovy_deg.dtype, device=fovy_deg.device)
    proj[:, 0, 0] = f / aspect
    proj[:, 1, 1] = f
    proj[:, 2, 2] = (far + near) / (near - far)
    proj[:, 2, 3] = 2 * far * near / (near - far)
    proj[:, 3, 2] = -1.0
    return proj


def spherical_to_position(elevation: Tensor, azimuth: Tensor, distance: Tensor) -> Tensor:
    """Camera centre (B, 3) for angles in degrees (y-up, azimuth 0 on +z)."""
    el, az = torch.deg2rad(elevation), torch.deg2rad(azimuth)
    return torch.stack(
        [distance * torch.cos(el) * torch.sin(az), distance * torch.sin(el), distance * torch.cos(el) * torch.cos(az)],
        dim=-1,
    )


def look_at(eye: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """Camera-to-world matrices (B, 4, 4) for OpenGL cameras at eye looking at target."""
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.nn.functional.normalize(torch.cross(forward, up, dim=-1), dim=-1)
    # Looking straight up or down makes up parallel to forward: fall back to +z as the up hint.
    degenerate = right.norm(dim=-1) < 1e-6
    if degenerate.any():
        alt = torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype, device=eye.device).expand_as(up)
        right = torch.where(degenerate[:, None], torch.nn.functional.normalize(torch.cross(forward, alt, dim=-1), dim=-1), right)
    true_up = torch.cross(right, forward, dim=-1)
    c2w = torch.eye(4, dtype=eye.dtype, device=eye.device).repeat(eye.shape[0], 1, 1)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = true_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = eye
    return c2w


def wrap_azimuth(azimuth: Tensor) -> Tensor:
    return (azimuth + 180.0) % 360.0 - 180.0


def make_cameras(elevation, azimuth, distance, fovy, center=None, up=None) -> Cameras:
    """Orbit cameras from angle tensors (degrees), optionally with a perturbed centre and up."""
    elevation, azimuth, distance, fovy = (torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in (elevation, azimuth, distance, fovy))
    n = max(elevation.numel(), azimuth.numel(), distance.numel(), fovy.numel())
    elevation, azimuth, distance, fovy = (v.expand(n).clone() if v.numel() == 1 else v for v in (elevation, azimuth, distance, fovy))
    azimuth = wrap_azimuth(azimuth)
    eye = spherical_to_position(elevation, azimuth, distance)
    target = torch.zeros_like(eye) if center is None else center
    up_vec = torch.tensor([0.0, 1.0, 0.0]).expand_as(eye) if up is None else up
    return Cameras(look_at(eye + target, target, up_vec), fovy, elevation, azimuth, distance)


def orbit_cameras(n: int, elevation: float = 15.0, distance: float = 3.0, fovy: float = 40.0, start_azimuth: float = 0.0) -> Cameras:
    """n evenly spaced views around the object: evaluation views and turntables."""
    azimuth = start_azimuth + torch.arange(n, dtype=torch.float32) * (360.0 / n)
    return make_cameras(torch.full((n,), float(elevation)), azimuth, torch.full((n,), float(distance)), torch.full((n,), float(fovy)))


def pixel_rays(cameras: Cameras, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Rays through pixel centres: origins and unit directions, each (B, H, W, 3)."""
    device = cameras.device
    focal = cameras.focal(height)  # (B,)
    v, u = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=device) + 0.5,
        torch.arange(width, dtype=torch.float32, device=device) + 0.5,
        indexing="ij",
    )
    x = (u - width / 2)[None] / focal[:, None, None]
    y = -(v - height / 2)[None] / focal[:, None, None]
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # (B, H, W, 3)
    dirs = torch.einsum("bij,bhwj->bhwi", cameras.c2w[:, :3, :3], dirs_cam)
    dirs = torch.nn.functional.normalize(dirs, dim=-1)
    origins = cameras.c2w[:, None, None, :3, 3].expand_as(dirs)
    return origins, dirs


@dataclass
class CameraSamplerConfig:
    """Random training views. Ranges are [low, high]; angles in degrees."""

    elevation: tuple[float, float] = (-10.0, 45.0)
    azimuth: tuple[float, float] = (-180.0, 180.0)
    distance: tuple[float, float] = (3.0, 3.5)
    fovy: tuple[float, float] = (40.0, 45.0)
    # Half the batches draw elevation uniformly in degrees, half uniformly on the sphere.
    uniform_sphere_fraction: float = 0.5
    stratified_azimuth: bool = True
    center_perturb: float = 0.0  # std of the look-at point, world units
    up_perturb: float = 0.0  # std added to the up vector
    # Progressive widening (Magic3D/threestudio style): ranges start at the front view
    # (elevation start_elevation, azimuth 0) and grow linearly to the full ranges by widen_steps.
    widen_steps: int = 0
    start_elevation: float = 0.0
    # Evaluation / turntable views.
    eval_elevation: float = 15.0
    eval_distance: float = 3.2
    eval_fovy: float = 42.5


@dataclass
class CameraSampler:
    config: CameraSamplerConfig = field(default_factory=CameraSamplerConfig)

    def _ranges(self, step: int):
        c = self.config
        if c.widen_steps <= 0 or step >= c.widen_steps:
            return c.elevation, c.azimuth
        f = max(step, 0) / c.widen_steps
        el = (c.start_elevation + f * (c.elevation[0] - c.start_elevation), c.start_elevation + f * (c.elevation[1] - c.start_elevation))
        az = (f * c.azimuth[0], f * c.azimuth[1])
        return el, az

    def sample(self, batch_size: int, step: int = 0, generator: torch.Generator | None = None) -> Cameras:
        """Draw batch_size random cameras (uses the global torch RNG unless a generator is given)."""
        c = self.config
        (el_lo, el_hi), (az_lo, az_hi) = self._ranges(step)

        def rand(n):
            return torch.rand(n, generator=generator)

        if rand(1).item() < c.uniform_sphere_fraction:
            # Uniform on the sphere band: sample sin(elevation) uniformly.
            s_lo, s_hi = math.sin(math.radians(el_lo)), math.sin(math.radians(el_hi))
            elevation = torch.rad2deg(torch.asin(s_lo + rand(batch_size) * (s_hi - s_lo)))
        else:
            elevation = el_lo + rand(batch_size) * (el_hi - el_lo)
        if c.stratified_azimuth:
            # One azimuth per equal slice of the range, jittered inside its slice.
            azimuth = az_lo + (torch.arange(batch_size) + rand(batch_size)) / batch_size * (az_hi - az_lo)
        else:
            azimuth = az_lo + rand(batch_size) * (az_hi - az_lo)
        distance = c.distance[0] + rand(batch_size) * (c.distance[1] - c.distance[0])
        fovy = c.fovy[0] + rand(batch_size) * (c.fovy[1] - c.fovy[0])
        center = None
        up = None
        if c.center_perturb > 0:
            center = torch.randn(batch_size, 3, generator=generator) * c.center_perturb
        if c.up_perturb > 0:
            up = torch.tensor([0.0, 1.0, 0.0]) + torch.randn(batch_size, 3, generator=generator) * c.up_perturb
        return make_cameras(elevation, azimuth, distance, fovy, center=center, up=up)

    def eval_cameras(self, n: int) -> Cameras:
        c = self.config
        return orbit_cameras(n, c.eval_elevation, c.eval_distance, c.eval_fovy)
