"""xtalscale.fit: the refinement engine (placeholder docstring, completed below)."""
