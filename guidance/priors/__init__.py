"""distill3d."""
