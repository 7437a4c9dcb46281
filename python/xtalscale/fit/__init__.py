"""The fit layer (Ih table, targets, normal equations, minimisers): consumes model blocks
through ``xtalscale._core`` (DerivativesView); imports data and model modules only."""
