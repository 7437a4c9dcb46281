"""dxtbx-shaped import path: ``from xtalscale.dxtbx.model.experiment_list import ExperimentList``."""
