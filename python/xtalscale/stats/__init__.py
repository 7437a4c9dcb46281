"""Statistics over scaled data (merging, merging statistics): above the model layer, beside
``xtalscale.fit``; imports data and model modules only."""
