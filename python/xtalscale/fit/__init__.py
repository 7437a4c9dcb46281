"""The fit layer (Ih table, targets, normal equations, minimisers, the scitbx-style dense
least squares of :mod:`.lstsq`, robust weights): consumes model blocks through
``xtalscale._core`` (DerivativesView); imports data and model modules only."""
