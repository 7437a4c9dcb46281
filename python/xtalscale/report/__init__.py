"""Reports (tables, plots, HTML) built from fit results and statistics."""
