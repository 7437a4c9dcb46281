# Stubs for xtalscale._core.smoothers (filled in with the smoother bindings).
