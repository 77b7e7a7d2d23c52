"""The view-biased oracle: a weightless prior that fails like a real text-to-image model (Janus).

The plain oracle (:mod:`.oracle`) answers every camera with the true view, so it cannot show the
multi-face ("Janus") failure. Real 2D priors are biased toward the canonical front view of an
object whatever the camera; view prompts and Perp-Neg exist to counter that bias. This prior
models it with an exact Gaussian mixture, so CFG and Perp-Neg see a real conditional structure.

Data distribution at camera c (pixel space [-1, 1], renders of the reference scene)
------------------------------------------------------------------------------------
    x0 | c, text ~ sum_k pi_k(c, text) N(mu_k(c), s^2 I),       s = ``noise_std``

with K = 5 components, each an exact render at c's distance and fovy:

    k = 0  "true"      the true view at c (elevation e, azimuth a)          label: bucket(c)
    k = 1  front       the canonical front view: azimuth 0 at elevation e   label: front
    k = 2  side        azimuth 90 sign(a) (a = 0: +90) at elevation e        label: side
    k = 3  back        azimuth 180 at elevation e                           label: back
    k = 4  overhead    elevation ``overhead_view_elevation`` at azimuth a   label: overhead

The text condition is a vector v over the view directions (front, side, back, overhead): zeros for
the plain prompt, one-hot for "<prompt>, <direction> view", a convex mix for Perp-Neg's
interpolated embeddings. The mixture weights are a softmax of

    logit_k = bias_k + suffix_gain * v[label_k],
    bias = (0, front_bias, other_bias, other_bias, other_bias).

So a plain prompt is front-biased (odds e^front_bias : 1 for the front over the true view at a back
camera); the suffix naming c's own bucket adds suffix_gain to the true view (and to the canonical
view of that bucket) but the front keeps its bias; a suffix naming another view ("front view" at a
back camera) adds suffix_gain to that view and pulls toward it. Rows marked unconditional
(``null`` = 1, the empty / negative prompt) have the oracle's unconditional distribution
N(mu_u, s^2 I), mu_u the constant grey 2 * ``unconditional_gray`` - 1.

Posterior-mean noise prediction (closed form)
---------------------------------------------
With x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, x_t | k ~ N(sqrt(abar) mu_k, sigma_t^2 I) with
sigma_t^2 = abar s^2 + 1 - abar, and E[eps | x_t, k] = sqrt(1 - abar) (x_t - sqrt(abar) mu_k) /
sigma_t^2 (eps and x_t are jointly Gaussian with covariance sqrt(1 - abar) I). The MMSE prediction
of the mixture averages these over the posterior responsibilities:

    r_k(x_t)  = softmax_k( log pi_k - ||x_t - sqrt(abar) mu_k||^2 / (2 sigma_t^2) )
    eps_hat   = sqrt(1 - abar) (x_t - sqrt(abar) sum_k r_k mu_k) / sigma_t^2.

(With one component this is the oracle's formula.) Responsibilities are exact, so in image space
(thousands of dimensions) they are nearly hard: the component nearest x_t wins except at the
highest noise levels, where the prior weights pi decide. ``bias_per_element`` switches the log
weights from per-image nats to nats per image element (multiplied by C*H*W), which keeps the
bias comparable to the data term at every noise level and resolution (see the parameter notes).

How a non-text prior takes part in view prompts and Perp-Neg
------------------------------------------------------------
Conditions are ``{"text": (B, 4), "null": (B, 1)}`` float tensors, so Perp-Neg's convex mix of the
four directional conditions (view_prompts.mix_condition) is a mix of view words, as with text
embeddings. The camera-dependent part (the K component means at the render's resolution, over the
render's own background, and c's bucket) is *bound* to the prior for the batch of cameras:
conditions(cameras, out) binds it, and so does view_conditions(cameras, out), which Perp-Neg calls
with the render. predict_noise maps row i of a call to camera i mod B (every guidance stacks whole
batches: [uncond; cond] or [uncond; pos; neg_1; neg_2]).

Parameters (defaults chosen so plain SDS reproduces the Janus failure; see bench_janus.py)
-------------------------------------------------------------------------------------------
``front_bias`` (log odds front : true for the plain prompt), ``other_bias`` (log prior of the
canonical side / back / overhead views; they matter only when a suffix names them),
``suffix_gain`` (what a view word adds to the components it names), ``bias_per_element``
(whether the three are per image element), ``noise_std`` (component width s, as the oracle's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distill3d.engine.cameras import Cameras, make_cameras
from distill3d.engine.errors import UserError
from distill3d.engine.interfaces import BuildContext, Condition, RenderOutput
from distill3d.engine.reference_scene import DEFAULT_SCENE
from distill3d.engine.references import load_reference
from distill3d.guidance.priors.oracle import PixelSpacePrior, scaled_linear_alphas_cumprod
from distill3d.guidance.view_prompts import BACK, DIRECTIONS, FRONT, OVERHEAD, SIDE, DirectionThresholds, ViewConditions, view_directions

COMPONENTS: tuple[str, ...] = ("true", "front", "side", "back", "overhead")
# Direction label of the canonical components 1..4 (component 0 takes the camera's own bucket).
CANONICAL_LABELS: tuple[int, ...] = (FRONT, SIDE, BACK, OVERHEAD)


class BiasedOracleError(UserError, ValueError):
    """A biased-oracle setting or call that cannot work, with what to do instead."""


@dataclass
class BiasedOracleConfig:
    # Scene file (JSON/YAML) or built-in scene name; None: the run's scene/reference, else the default scene.
    scene: str | None = None
    noise_std: float = 0.1  # s: width of every component, in [-1, 1] units (as the oracle's)
    image_size: int | None = None  # None: the render's size; else renders and means are resized to this
    unconditional_gray: float = 0.5
    view_dependent_prompts: bool = True  # conditions() adds "<direction> view" for the camera's bucket
    front_bias: float = 2.2  # log odds front : true view for a plain prompt (e^2.2 ~ 9 : 1)
    other_bias: float = -3.0  # log prior of the canonical side / back / overhead views
    suffix_gain: float = 3.0  # added to the log weight of the components a view word names
    bias_per_element: bool = False  # True: the three above are nats per image element (x C*H*W)
    overhead_view_elevation: float = 80.0  # elevation of the canonical overhead view
    overhead_elevation: float = 60.0  # bucket thresholds (as the text priors')
    front_azimuth: float = 45.0
    back_azimuth: float = 135.0
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def __post_init__(self):
        if not self.noise_std > 0:
            raise ValueError(f"noise_std must be > 0 for a mixture, got {self.noise_std}")
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"image_size must be positive or null, got {self.image_size}")
        if not 0.0 <= self.unconditional_gray <= 1.0:
            raise ValueError(f"unconditional_gray must lie in [0, 1], got {self.unconditional_gray}")
        if self.suffix_gain < 0:
            raise ValueError(f"suffix_gain must be >= 0 (a view word cannot push away from its view), got {self.suffix_gain}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start} and {self.beta_end}")


def component_logits(text: Tensor, camera_direction: Tensor, front_bias: float, other_bias: float, suffix_gain: float) -> Tensor:
    """Log mixture weights (N, K) (unnormalised) from view words text (N, 4) and buckets (N,)."""
    text = text.float()
    n = text.shape[0]
    bias = torch.tensor([0.0, front_bias, other_bias, other_bias, other_bias], device=text.device)
    labels = torch.empty(n, len(COMPONENTS), dtype=torch.long, device=text.device)
    labels[:, 0] = camera_direction.to(text.device)
    labels[:, 1:] = torch.tensor(CANONICAL_LABELS, device=text.device)
    return bias + suffix_gain * torch.gather(text, 1, labels)


def mixture_posterior_noise(x_t: Tensor, abar: Tensor, means: Tensor, log_weights: Tensor, noise_std: float) -> Tensor:
    """Exact E[eps | x_t] for x0 ~ sum_k softmax(log_weights)_k N(means_k, s^2 I) (module docstring).

    x_t (N, ...), abar (N,), means (N, K, ...), log_weights (N, K). Computed in float64 for the
    responsibilities (squared distances of thousands of elements)."""
    n, k = log_weights.shape
    a = abar.to(torch.float64).view(n, *([1] * (x_t.dim() - 1)))
    var = a * noise_std**2 + 1 - a
    x = x_t.to(torch.float64)
    mu = means.to(torch.float64)
    diff = x.unsqueeze(1) - a.sqrt().unsqueeze(1) * mu  # (N, K, ...)
    sq = diff.flatten(2).pow(2).sum(-1)  # (N, K)
    logr = log_weights.to(torch.float64) - sq / (2 * var.view(n, 1))
    r = torch.softmax(logr, dim=1)
    mean = torch.einsum("nk,nk...->n...", r, mu)
    return ((1 - a).sqrt() * (x - a.sqrt() * mean) / var).to(x_t.dtype)


def canonical_cameras(cameras: Cameras, overhead_view_elevation: float) -> list[Cameras]:
    """The true cameras and the four canonical ones (front, side, back, overhead) at c's distance and fovy."""
    el, az, dist, fovy = cameras.elevation, cameras.azimuth, cameras.distance, cameras.fovy
    side = torch.where(az < 0, -90.0, 90.0)
    views = [
        (el, torch.zeros_like(az)),
        (el, side),
        (el, torch.full_like(az, 180.0)),
        (torch.full_like(el, overhead_view_elevation), az),
    ]
    return [cameras] + [make_cameras(e.cpu(), a.cpu(), dist.cpu(), fovy.cpu()).to(cameras.device) for e, a in views]


class BiasedOraclePrior(PixelSpacePrior):
    """Front-biased Gaussian-mixture oracle in pixel space [-1, 1] (see the module docstring)."""

    Config = BiasedOracleConfig

    def __init__(self, config: BiasedOracleConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        source = config.scene or getattr(ctx, "scene", None) or getattr(ctx, "reference", None) or DEFAULT_SCENE
        self.scene = load_reference(source)
        self.thresholds = DirectionThresholds(config.overhead_elevation, config.front_azimuth, config.back_azimuth)
        self.num_train_timesteps = config.num_train_timesteps
        self.register_buffer(
            "alphas_cumprod",
            scaled_linear_alphas_cumprod(config.beta_start, config.beta_end, config.num_train_timesteps),
            persistent=False,
        )
        self._last_render: RenderOutput | None = None
        self._bound: tuple[Tensor, Tensor] | None = None  # means (B, K, 3, h, w), buckets (B,)

    # ----- images (pixel space: PixelSpacePrior) ---------------------------------------------
    def encode_render(self, out: RenderOutput) -> Tensor:
        self._last_render = out  # view_conditions() binds its cameras to this render's size and background
        return super().encode_render(out)

    @torch.no_grad()
    def reference_render(self, cameras: Cameras, height: int, width: int, background: Tensor | None = None) -> RenderOutput:
        return self.scene.render(cameras, height, width, background=background)

    # ----- conditions -----------------------------------------------------------------------
    def directions(self, cameras: Cameras) -> Tensor:
        return view_directions(cameras.elevation, cameras.azimuth, self.thresholds)

    @torch.no_grad()
    def bind(self, cameras: Cameras, out: RenderOutput) -> None:
        """Render the K component means for these cameras at out's resolution over out's background."""
        b, h, w = out.rgb.shape[:3]
        if len(cameras) != b:
            raise ValueError(f"biased oracle: {len(cameras)} cameras for a batch of {b} renders")
        k = len(COMPONENTS)
        background = None if out.background is None else out.background.detach().expand(b, h, w, 3).repeat(k, 1, 1, 1)
        views = Cameras.cat(canonical_cameras(cameras, self.config.overhead_view_elevation))  # one render call: (K B) views
        ref = self.scene.render(views, h, w, background=background)
        means = self.encode_images(ref.rgb.permute(0, 3, 1, 2).to(out.rgb.device, torch.float32))
        self._bound = (means.view(k, b, *means.shape[1:]).transpose(0, 1), self.directions(cameras).to(out.rgb.device))

    def text_condition(self, text: Tensor, null: bool = False) -> Condition:
        text = text.float()
        return {"text": text, "null": torch.full((text.shape[0], 1), float(null), device=text.device)}

    @torch.no_grad()
    def conditions(self, cameras: Cameras, out: RenderOutput) -> tuple[Condition, Condition]:
        """(view words of each camera's bucket, or none; unconditional), after binding the cameras."""
        self.bind(cameras, out)
        b = len(cameras)
        text = torch.zeros(b, len(DIRECTIONS), device=out.rgb.device)
        if self.config.view_dependent_prompts:
            text[torch.arange(b), self._bound[1]] = 1.0
        return self.text_condition(text), self.text_condition(torch.zeros_like(text), null=True)

    @torch.no_grad()
    def view_conditions(self, cameras: Cameras, out: RenderOutput | None = None) -> ViewConditions:
        """Perp-Neg's per-direction conditions: one-hot view words for (front, side, back, overhead)."""
        out = out if out is not None else self._last_render
        if out is None:
            raise BiasedOracleError("biased oracle: view_conditions() needs the render (encode_render(out) first, or pass out)")
        self.bind(cameras, out)
        device = out.rgb.device
        directional = self.text_condition(torch.eye(len(DIRECTIONS), device=device))
        uncond = self.text_condition(torch.zeros(len(cameras), len(DIRECTIONS), device=device), null=True)
        return ViewConditions(directional, uncond, self._bound[1].cpu())

    # ----- the denoiser ---------------------------------------------------------------------
    def log_weights(self, text: Tensor, camera_direction: Tensor, numel: int) -> Tensor:
        c = self.config
        scale = float(numel) if c.bias_per_element else 1.0
        return component_logits(text, camera_direction, c.front_bias * scale, c.other_bias * scale, c.suffix_gain * scale)

    @torch.no_grad()
    def predict_noise(self, x_t: Tensor, t: Tensor, condition: Condition, is_conditional: Tensor | None = None) -> Tensor:
        """Posterior-mean eps of the mixture for each row (row i uses bound camera i mod B).

        The unconditional rows are those whose condition has ``null`` = 1; is_conditional is not needed."""
        if self._bound is None:
            raise BiasedOracleError("biased oracle: predict_noise() before conditions()/view_conditions() bound the cameras")
        means, buckets = self._bound
        n, b = x_t.shape[0], means.shape[0]
        if n % b != 0 or tuple(means.shape[-3:]) != tuple(x_t.shape[-3:]):
            raise BiasedOracleError(
                f"biased oracle: a call of {n} rows of shape {tuple(x_t.shape[1:])} does not stack whole batches of the "
                f"{b} bound cameras at {tuple(means.shape[-3:])}"
            )
        rows = torch.arange(n, device=x_t.device) % b
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1)
        abar = self.alphas_cumprod[t.to(self.alphas_cumprod.device)].to(x_t.device)
        mu = means[rows]
        logw = self.log_weights(condition["text"].to(x_t.device), buckets[rows], x_t[0].numel())
        eps = mixture_posterior_noise(x_t, abar, mu, logw, self.config.noise_std)
        null = condition["null"].to(x_t.device).view(n) > 0.5
        if null.any():
            gray = torch.full_like(mu[null, :1], 2.0 * self.config.unconditional_gray - 1.0)
            eps[null] = mixture_posterior_noise(x_t[null], abar[null], gray, torch.zeros(int(null.sum()), 1, device=x_t.device), self.config.noise_std)
        return eps
