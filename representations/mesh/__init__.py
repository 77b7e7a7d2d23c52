"""Triangle meshes: rasterizer, mesh I/O, UV baking and export."""
