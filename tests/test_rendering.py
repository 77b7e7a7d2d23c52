import torch

from distill3d.representations.nerf.rendering import Samples, composite_torch, march_torch, ray_sphere_bounds


def naive_composite(sigmas, rgbs, samples):
    out_rgb = torch.zeros(samples.n_rays, 3, dtype=sigmas.dtype)
    out_op = torch.zeros(samples.n_rays, 1, dtype=sigmas.dtype)
    out_depth = torch.zeros(samples.n_rays, 1, dtype=sigmas.dtype)
    for r in range(samples.n_rays):
        T = torch.ones((), dtype=sigmas.dtype)
        for i in torch.nonzero(samples.ray_indices == r).flatten().tolist():
            a = 1 - torch.exp(-sigmas[i] * samples.deltas[i])
            w = T * a
            out_rgb[r] += w * rgbs[i]
            out_op[r] += w
            out_depth[r] += w * samples.t_mid[i]
            T = T * (1 - a)
    return out_rgb, out_op, out_depth


def make_samples(n_rays=5, max_per_ray=7):
    counts = torch.randint(0, max_per_ray, (n_rays,))
    idx = torch.arange(n_rays).repeat_interleave(counts)
    t = torch.cat([torch.sort(torch.rand(int(c))).values * 2 + 1 for c in counts])
    return Samples(idx, t.double(), torch.full((idx.numel(),), 0.1, dtype=torch.float64), n_rays)


def test_composite_matches_naive_and_gradients():
    samples = make_samples()
    s = samples.ray_indices.numel()
    sigmas = (torch.rand(s, dtype=torch.float64) * 20).requires_grad_()
    rgbs = torch.rand(s, 3, dtype=torch.float64, requires_grad=True)
    out = composite_torch(sigmas, rgbs, samples)
    ref_rgb, ref_op, ref_depth = naive_composite(sigmas, rgbs, samples)
    assert torch.allclose(out.rgb, ref_rgb) and torch.allclose(out.opacity, ref_op) and torch.allclose(out.depth, ref_depth)
    g1 = torch.autograd.grad(out.rgb.sum() + out.opacity.sum(), (sigmas, rgbs))
    g2 = torch.autograd.grad(ref_rgb.sum() + ref_op.sum(), (sigmas, rgbs))
    assert all(torch.allclose(a, b) for a, b in zip(g1, g2))


def test_opaque_sample_stops_light():
    samples = Samples(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]), 1)
    out = composite_torch(torch.tensor([100.0, 100.0]), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), samples)
    assert torch.allclose(out.rgb, torch.tensor([[1.0, 0, 0]]), atol=1e-6)
    assert torch.allclose(out.depth, torch.tensor([[1.0]]), atol=1e-5)


def test_sphere_bounds_and_march_with_occupancy():
    o = torch.tensor([[0.0, 0.0, 3.0], [0.0, 5.0, 3.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    near, far, hit = ray_sphere_bounds(o, d, 1.0)
    assert hit.tolist() == [True, False] and abs(near[0] - 2) < 1e-6 and abs(far[0] - 4) < 1e-6
    samples = march_torch(o, d, near, far, 8, lambda p: p[:, 2] > 0, jitter=False)
    assert samples.ray_indices.tolist() == [0] * 4  # only the half with z > 0, none for the miss
    assert torch.allclose(samples.t_mid, torch.tensor([2.125, 2.375, 2.625, 2.875]))
