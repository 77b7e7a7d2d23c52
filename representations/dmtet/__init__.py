"""DMTet: a deformable tetrahedral grid with per-vertex SDF, extracted by marching tetrahedra and
rendered by rasterization (Magic3D / Magic123 fine stage)."""
