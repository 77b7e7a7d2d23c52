"""Backend registrations for mesh ops (rasterize). Filled in by the mesh work."""
