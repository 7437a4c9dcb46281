# ruff: noqa  (a user's script kept verbatim; only its import lines are ours)
# The commissioning API's "Gaussian Smoothing Components Usage" (seed_framework_api.md §7),
# kept as written except for its import lines: the smoother import names the xtalscale module
# at DIALS's path, and the names the seed took from its §5 (`ScaleComponentBase`, `flex`) are
# imported here.
from xtalscale.algorithms.scaling.model.components.scale_components import ScaleComponentBase
from xtalscale.algorithms.scaling.model.components.smooth_scale_components import GaussianSmoother1D
from xtalscale.array_family import flex

class SmoothScaleComponent(ScaleComponentBase):
    """Component using Gaussian smoothing for parameter regularization"""
    
    def __init__(self, active_parameter_manager, coordinate_values, n_control_points=20):
        super().__init__(active_parameter_manager)
        
        # Set up coordinate range
        self.coord_min = flex.min(coordinate_values) 
        self.coord_max = flex.max(coordinate_values)
        self.coord_range = (self.coord_min, self.coord_max)
        
        # Create Gaussian smoother
        self.smoother = GaussianSmoother1D(
            n_parameters=n_control_points,
            value_range=self.coord_range
        )
        
        # Initialize control point values
        initial_values = flex.double([1.0] * n_control_points)
        self.active_parameter_manager.add_parameters(initial_values)
        
        # Store coordinate values for evaluation
        self.coordinate_values = coordinate_values
    
    @property
    def n_params(self):
        return self.smoother.n_parameters
    
    def calculate_scales_and_derivatives(self, reflection_table, block_id=None):
        """Calculate smoothed scales using Gaussian interpolation"""
        
        # Get current parameter values
        control_values = self.parameters
        
        # Set control point values in smoother
        self.smoother.set_parameters(control_values)
        
        # Evaluate smoother at coordinate positions
        scales, errors = self.smoother.value_error_for_location(self.coordinate_values)
        
        # Calculate derivatives: ∂scale_i/∂control_j
        derivatives = flex.double(flex.grid(len(scales), self.n_params), 0.0)
        
        # Use analytical derivatives from smoother weight matrices
        # DIALS GaussianSmoother classes provide analytical derivatives through weight matrices
        # This is more accurate and efficient than finite differences
        for i, coord in enumerate(self.coordinate_values):
            # Get analytical weights and values at coordinate location
            weight_result = self.smoother.value_weight(coord)
            weights = weight_result.get_weight()  # Weight matrix for this coordinate
            
            # Weights provide direct derivatives: ∂scale_i/∂control_j = weight[i,j]
            for j in range(self.n_params):
                derivatives[i, j] = weights[j]  # Direct analytical derivative
        
        return scales, derivatives
