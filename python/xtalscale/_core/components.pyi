# Stubs for xtalscale._core.components (filled in with the component bindings).
