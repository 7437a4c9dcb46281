"""dxtbx-shaped import path, e.g.
``from xtalscale.dxtbx.model.experiment_list import ExperimentList``."""
