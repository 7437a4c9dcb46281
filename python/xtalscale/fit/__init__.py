"""The fit layer: least-squares machinery, robust weights and the refinement engine."""
