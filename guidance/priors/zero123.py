"""Zero-1-to-3 / Stable Zero123: a view-conditioned image prior (registry name `zero123`).

Given the input view (an image and its camera) it predicts the noise of a novel view described by
its camera relative to the input: score distillation with it turns one photo into a 3D object.

Loading (no code from the model folder is ever executed): a diffusers-format folder by local path
or hub id, in either public layout, told apart by model_index.json's `_class_name`:
  Zero123Pipeline                  (bennyguo/zero123-xl-diffusers, ashawkey/stable-zero123-diffusers):
                                   camera projection in clip_camera_projection/, weights proj.*
  Zero1to3StableDiffusionPipeline  (kxic/zero123-xl, kxic/stable-zero123): cc_projection/, projection.*
Both hold unet/ (UNet2DConditionModel, 8 input channels), vae/, image_encoder/
(CLIPVisionModelWithProjection) and scheduler/. Each is loaded with its diffusers / transformers
class; the projection, whose class lives in a custom module those folders expect to import, is read
as a plain Linear(768 + 4, 768) from its weights file (safetensors, or a .bin through
torch.load(weights_only=True)). guidance/priors/loading.py finds the model and words the errors
(offline hub id, missing component).

Conditioning, exactly as the model was trained (Zero123's data loader, threestudio's guidance):
  - the input view over white at the model's image size (256);
  - its CLIP image embedding (B, 1, 768), concatenated with the camera vector (below) and projected
    back to 768: the cross-attention condition;
  - its VAE latent (posterior mode, NOT multiplied by the VAE scaling factor) concatenated to the
    noisy latent along channels (4 + 4 = 8 UNet input channels);
  - unconditional branch: zeros for both the projected embedding and the concatenated latent.
Renders are encoded like Stable Diffusion's (resized to 256, VAE posterior sample x 0.18215).

Camera vector (`camera_embedding`), relative to the input view, angles in radians:
  [d_polar, sin(d_azimuth), cos(d_azimuth), d_distance]
  d_polar = (90 - elevation) - (90 - ref_elevation) = -(elevation - ref_elevation)  (polar from the up axis)
  d_azimuth = azimuth - ref_azimuth, azimuth growing counterclockwise about the up axis seen from
              above. This project's +azimuth (y up, azimuth 0 on +z, positive toward +x) is
              counterclockwise seen from above (tests/test_zero123_prior.py derives it from the
              camera positions), so it enters unchanged, as in threestudio's z-up frame.
  Stable Zero123: the 4th entry is the absolute polar angle of the input view, 90 - ref_elevation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill3d.engine.cameras import Cameras
from distill3d.engine.errors import UserError
from distill3d.engine.interfaces import BuildContext, Condition, Prior, RenderOutput
from distill3d.guidance.priors.loading import (
    Component,
    InvalidModelFolderError,
    ModelLayout,
    ModelNotFoundError,
    OOMAdvice,
    PriorError,
    ResolvedModel,
    _weight_files,
    call_quietly,
    hub_error,
    load_component,
    looks_like_path,
    not_cached_message,
    offline_mode,
    oom_guard,
    pick_dtype,
    resolve_model,
)

CameraVector = Literal["zero123", "stable"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------
# The camera vector


def camera_embedding(
    elevation, azimuth, distance, ref_elevation, ref_azimuth, ref_distance, variant: CameraVector = "zero123"
) -> Tensor:
    """(..., 4) camera vector of target views relative to the reference view (degrees in).

    zero123: [d_polar, sin(d_azimuth), cos(d_azimuth), distance - ref_distance];
    stable:  [d_polar, sin(d_azimuth), cos(d_azimuth), polar of the reference], radians.
    """
    values = [torch.as_tensor(v, dtype=torch.float32) for v in (elevation, azimuth, distance, ref_elevation, ref_azimuth, ref_distance)]
    el, az, dist, rel, raz, rdist = torch.broadcast_tensors(*values)
    d_polar = torch.deg2rad(-(el - rel))
    d_az = torch.deg2rad(az - raz)
    if variant == "zero123":
        last = dist - rdist
    elif variant == "stable":
        last = torch.deg2rad(90.0 - rel)
    else:
        raise ValueError(f"unknown camera vector variant {variant!r}; use zero123 or stable")
    return torch.stack([d_polar, torch.sin(d_az), torch.cos(d_az), last], dim=-1)


def camera_from_embedding(
    embedding: Tensor, ref_elevation: float, ref_azimuth: float, ref_distance: float, variant: CameraVector = "zero123"
) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of camera_embedding: (elevation, azimuth in [-180, 180), distance) of the target views.
    The stable variant carries no distance: the reference distance is returned."""
    e = embedding.float()
    elevation = ref_elevation - torch.rad2deg(e[..., 0])
    azimuth = (ref_azimuth + torch.rad2deg(torch.atan2(e[..., 1], e[..., 2])) + 180.0) % 360.0 - 180.0
    distance = ref_distance + e[..., 3] if variant == "zero123" else torch.full_like(elevation, float(ref_distance))
    return elevation, azimuth, distance


# ---------------------------------------------------------------------------------------------
# Folder layouts


def _layout(projection_folder: str, kind: str, example: str) -> ModelLayout:
    return ModelLayout(
        kind=kind,
        components=(
            Component("unet", (("config.json",),), needs_weights=True),
            Component("vae", (("config.json",),), needs_weights=True),
            Component("image_encoder", (("config.json",),), needs_weights=True),
            Component("scheduler", (("scheduler_config.json",),)),
            Component(projection_folder, (), needs_weights=True),
        ),
        example_id=example,
    )


@dataclass(frozen=True)
class Zero123Layout:
    pipeline: str
    layout: ModelLayout
    projection_folder: str
    weight_prefix: str


LAYOUTS = {
    "Zero123Pipeline": Zero123Layout(
        "Zero123Pipeline", _layout("clip_camera_projection", "Zero123", "bennyguo/zero123-xl-diffusers"), "clip_camera_projection", "proj"
    ),
    "Zero1to3StableDiffusionPipeline": Zero123Layout(
        "Zero1to3StableDiffusionPipeline", _layout("cc_projection", "Zero123", "kxic/zero123-xl"), "cc_projection", "projection"
    ),
}
INDEX_LAYOUT = ModelLayout("Zero123", (Component(".", (("model_index.json",),)),), "bennyguo/zero123-xl-diffusers")


def read_model_index(model: str, local_files_only: bool | None, revision: str | None) -> dict:
    """model_index.json of a folder or hub id (cache first; downloaded only when online)."""
    path = Path(model).expanduser()
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise InvalidModelFolderError(
                f"{path} is not a diffusers Zero123 folder: missing model_index.json (expected a folder as written by "
                "`huggingface-cli download bennyguo/zero123-xl-diffusers --local-dir DIR`)"
            )
        file = index
    elif looks_like_path(model):
        raise ModelNotFoundError(f"Zero123 model folder {model!r} does not exist; pass an existing folder or a hub id such as bennyguo/zero123-xl-diffusers")
    else:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model, "model_index.json", revision=revision)
        except Exception:  # noqa: BLE001 - an invalid repo id, for one
            cached = None
        if isinstance(cached, str):
            file = Path(cached)
        elif bool(local_files_only) or offline_mode():
            raise ModelNotFoundError(not_cached_message(model, INDEX_LAYOUT))
        else:
            try:
                file = Path(hf_hub_download(model, "model_index.json", revision=revision))
            except Exception as exc:  # noqa: BLE001
                raise hub_error(model, INDEX_LAYOUT, exc) from exc
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidModelFolderError(f"{model}: model_index.json is not readable JSON ({exc})") from exc


def pick_layout(index: dict, model: str) -> Zero123Layout:
    name = index.get("_class_name")
    if name not in LAYOUTS:
        raise InvalidModelFolderError(
            f"{model}: model_index.json names the pipeline {name!r}, which is not a Zero123 model; supported: "
            f"{', '.join(LAYOUTS)} (diffusers-format Zero123, Zero123-XL and Stable Zero123 folders)"
        )
    return LAYOUTS[name]


def load_projection(source: ResolvedModel, layout: Zero123Layout) -> nn.Linear:
    """The camera projection Linear(768 + 4, 768) from its weights file, without its custom class."""
    folder = Path(source.folder) / layout.projection_folder if source.folder is not None else None
    files = _weight_files(folder) if folder is not None else []
    if not files and source.hub_id and not source.local_files_only:
        from huggingface_hub import list_repo_files, hf_hub_download

        try:
            names = [n for n in list_repo_files(source.hub_id, revision=source.revision) if n.startswith(layout.projection_folder + "/")]
            files = [Path(hf_hub_download(source.hub_id, n, revision=source.revision)) for n in names if n.endswith((".safetensors", ".bin"))]
        except Exception as exc:  # noqa: BLE001
            raise hub_error(source.name, layout.layout, exc) from exc
    files = sorted((f for f in files if f.suffix in (".safetensors", ".bin")), key=lambda f: f.suffix != ".safetensors")
    if not files:
        raise InvalidModelFolderError(f"{source.name}: {layout.projection_folder}/ has no weights (*.safetensors or *.bin)")
    file = files[0]
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)  # tensors only: no pickled code runs
    weight = state.get(f"{layout.weight_prefix}.weight")
    bias = state.get(f"{layout.weight_prefix}.bias")
    if weight is None or bias is None or weight.dim() != 2 or weight.shape[1] != weight.shape[0] + 4:
        raise InvalidModelFolderError(
            f"{source.name}: {layout.projection_folder}/{file.name} should hold {layout.weight_prefix}.weight (D, D + 4) and "
            f"{layout.weight_prefix}.bias (D,); found {sorted(state)[:6]}"
        )
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight.float())
        linear.bias.copy_(bias.float())
    return linear


def _clip_normalization(source: ResolvedModel) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """CLIP mean/std from feature_extractor/preprocessor_config.json when present (else CLIP's)."""
    if source.folder is not None:
        cfg = Path(source.folder) / "feature_extractor" / "preprocessor_config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            return tuple(data.get("image_mean", CLIP_MEAN)), tuple(data.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


# ---------------------------------------------------------------------------------------------
# The prior


@dataclass
class Zero123Config:
    model: str = "bennyguo/zero123-xl-diffusers"  # hub id or local diffusers folder (--model DIR)
    revision: str | None = None
    local_files_only: bool | None = None  # true: never touch the network
    camera_vector: CameraVector = "zero123"  # "stable" for Stable Zero123 (4th entry: reference polar)
    half_precision: bool | None = None  # fp16 on CUDA (null: follow trainer.mixed_precision); fp32 on CPU
    attention_slicing: bool = False
    vae_slicing: bool = False
    image_size: int | None = None  # null: the model's native size (256)


class ReferenceCameraPrior(Prior):
    """What the real Zero123 and the oracle share: the reference view and the camera vectors.

    conditions() gives {"camera": (B, 4), "weight": (B, 1)} with weight 1 for the conditional and 0
    for the unconditional rows; predict_noise sees nothing else about the views.
    """

    def setup_reference(self, ctx: BuildContext, path: str) -> None:
        """The run's input view (ctx.reference_view, built once by the trainer from `reference_view:`)."""
        if ctx.reference_view is None:
            raise UserError(
                f"{path}: a view-conditioned prior needs the input image: --image FILE (recipe key reference_view.image)"
            )
        self.reference_view = ctx.reference_view
        cam = self.reference_view.camera
        self.ref_elevation = float(cam.elevation[0])
        self.ref_azimuth = float(cam.azimuth[0])
        self.ref_distance = float(cam.distance[0])

    def camera_vectors(self, cameras: Cameras) -> Tensor:
        return camera_embedding(
            cameras.elevation, cameras.azimuth, cameras.distance, self.ref_elevation, self.ref_azimuth, self.ref_distance,
            self.config.camera_vector,
        )

    def conditions(self, cameras: Cameras, out: RenderOutput | None = None) -> tuple[Condition, Condition]:
        camera = self.camera_vectors(cameras).to(cameras.device)
        ones = torch.ones(len(cameras), 1, device=cameras.device)
        return {"camera": camera, "weight": ones}, {"camera": camera, "weight": torch.zeros_like(ones)}

    @staticmethod
    def condition_weight(condition: Condition, is_conditional: Tensor | None, device) -> Tensor:
        if is_conditional is not None:
            return is_conditional.to(device=device, dtype=torch.float32).view(-1, 1)
        return condition["weight"].to(device=device, dtype=torch.float32).view(-1, 1)


class Zero123Prior(ReferenceCameraPrior):
    Config = Zero123Config
    FROZEN = ("unet", "vae", "image_encoder", "projection")

    def __init__(self, config: Zero123Config, ctx: BuildContext, path: str = "prior"):
        super().__init__(config, ctx)
        self.setup_reference(ctx, path)
        self.device = torch.device(ctx.device)
        self.dtype = pick_dtype(self.device, config.half_precision, ctx.half_precision)
        index = read_model_index(config.model, config.local_files_only, config.revision)
        self.zlayout = pick_layout(index, config.model)
        self.source = resolve_model(config.model, self.zlayout.layout, config.local_files_only, config.revision)
        self.oom = OOMAdvice("Zero123", config.model, [
            "trainer.batch_size (views per step)",
            "guidance.<i>.prior.attention_slicing: true and guidance.<i>.prior.vae_slicing: true",
            "guidance.<i>.prior.half_precision: true (fp16; already the default on CUDA)",
        ])
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPVisionModelWithProjection

        layout = self.zlayout.layout
        scheduler = call_quietly(lambda: load_component(DDPMScheduler, self.source, "scheduler", layout))
        if scheduler.config.prediction_type != "epsilon":
            raise PriorError(f"{config.model}: Zero123 predicts noise (epsilon); this scheduler says {scheduler.config.prediction_type!r}")
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.detach().float().to(self.device), persistent=False)
        with oom_guard(self.oom, "model loading"):
            self.unet = call_quietly(lambda: load_component(UNet2DConditionModel, self.source, "unet", layout, dtype=self.dtype))
            self.vae = call_quietly(lambda: load_component(AutoencoderKL, self.source, "vae", layout, dtype=self.dtype))
            encoder = call_quietly(
                lambda: load_component(CLIPVisionModelWithProjection, self.source, "image_encoder", layout, dtype=self.dtype, library="transformers")
            )
            self.projection = load_projection(self.source, self.zlayout)
            for net in (self.unet, self.vae, encoder, self.projection):
                net.to(self.device).eval().requires_grad_(False)
        if self.unet.config.in_channels != 2 * self.vae.config.latent_channels:
            raise InvalidModelFolderError(
                f"{config.model}: the UNet takes {self.unet.config.in_channels} input channels; Zero123 needs "
                f"{2 * self.vae.config.latent_channels} (noisy latent + input-view latent)"
            )
        if self.projection.out_features != self.unet.config.cross_attention_dim:
            raise InvalidModelFolderError(
                f"{config.model}: the camera projection gives {self.projection.out_features} features, the UNet expects "
                f"{self.unet.config.cross_attention_dim}"
            )
        if config.attention_slicing:
            self.unet.set_attention_slice("auto")
        if config.vae_slicing:
            self.vae.enable_slicing()
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_size = int(config.image_size or self.unet.config.sample_size * scale)
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 0.18215) or 0.18215)
        with torch.no_grad(), oom_guard(self.oom, "input-view encoding"):
            image = self.reference_view.over_white(self.image_size).to(self.device)  # (1, 3, s, s) in [0, 1]
            embeds = self._clip_embedding(encoder, image)
            latents = self.vae.encode((image * 2 - 1).to(self.dtype)).latent_dist.mode()  # NOT scaled (as trained)
        del encoder  # only the input view's embedding is needed
        self.register_buffer("image_embeds", embeds.float(), persistent=False)  # (1, 1, D)
        self.register_buffer("image_latents", latents.float(), persistent=False)  # (1, 4, h, w)

    def _clip_embedding(self, encoder, image: Tensor) -> Tensor:
        mean, std = _clip_normalization(self.source)
        size = int(encoder.config.image_size)
        x = F.interpolate(image.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        x = (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        return encoder(pixel_values=x.to(self.dtype)).image_embeds.float()[:, None, :]

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.FROZEN:
            getattr(self, name).eval()
        return self

    def encode_images(self, rgb: Tensor) -> Tensor:
        size = (self.image_size, self.image_size)
        x = rgb if tuple(rgb.shape[-2:]) == size else F.interpolate(rgb, size, mode="bilinear", align_corners=False)
        x = (x * 2 - 1).to(self.device, self.dtype)
        with oom_guard(self.oom, "VAE encoder"):
            latents = self.vae.encode(x).latent_dist.sample() * self.scaling_factor
        return latents.float()

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        x = (latents / self.scaling_factor).to(self.device, self.dtype)
        with oom_guard(self.oom, "VAE decoder"):
            images = self.vae.decode(x).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def encoder_states(self, condition: Condition, weight: Tensor) -> Tensor:
        """projection(cat[CLIP embedding, camera vector]) for conditional rows, zeros otherwise: (B, 1, D)."""
        camera = condition["camera"].to(self.device, torch.float32)
        clip = self.image_embeds.expand(camera.shape[0], -1, -1)
        states = self.projection(torch.cat([clip, camera[:, None, :]], dim=-1))
        return states * weight[:, :, None]

    @torch.no_grad()
    def predict_noise(self, x_t: Tensor, t: Tensor, condition: Condition, is_conditional: Tensor | None = None) -> Tensor:
        weight = self.condition_weight(condition, is_conditional, self.device)
        states = self.encoder_states(condition, weight).to(self.dtype)
        b = x_t.shape[0]
        latents = self.image_latents.expand(b, -1, -1, -1) * weight[:, :, None, None]
        inputs = torch.cat([x_t.to(self.device, torch.float32), latents], dim=1).to(self.dtype)
        t = torch.as_tensor(t, device=self.device).reshape(-1)
        with oom_guard(self.oom, "UNet"):
            return self.unet(inputs, t, encoder_hidden_states=states).sample.float()
