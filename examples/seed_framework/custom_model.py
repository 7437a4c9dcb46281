# ruff: noqa  (a user's script kept verbatim; only its import lines are ours)
# The commissioning API's "Example Usage - Custom Scaling Model" (seed_framework_api.md §5),
# kept as written except for its import lines: every `dials.`/`scitbx`/`cctbx` import now
# names the xtalscale module at the same path. It is a user's script, slips included (the
# `parameters` properties slice the shared manager from its start, which assumes a single
# component): see run_seed_scripts.py for what it does on real reflections.
from xtalscale.algorithms.scaling.model import ScalingModelBase
from xtalscale.algorithms.scaling.model.components.scale_components import ScaleComponentBase
from xtalscale.algorithms.scaling.active_parameter_managers import active_parameter_manager
from xtalscale.array_family import flex
from xtalscale.scitbx import matrix

class SimpleMultiplicativeComponent(ScaleComponentBase):
    """Simple multiplicative scale factor component"""
    
    def __init__(self, active_parameter_manager, initial_scale=1.0):
        # Initialize with single parameter
        super().__init__(active_parameter_manager)
        self._initial_scale = initial_scale
        
        # Add parameter to manager
        self.active_parameter_manager.add_parameters(
            flex.double([initial_scale])  # Single scale parameter
        )
    
    @property
    def n_params(self):
        return 1
    
    @property  
    def parameters(self):
        return self.active_parameter_manager.get_parameters()[:self.n_params]
    
    def calculate_scales_and_derivatives(self, reflection_table, block_id=None):
        """
        Calculate scales and derivatives for all reflections
        
        Returns:
            tuple: (scales, derivatives) where derivatives[i,j] = ∂scale_i/∂param_j
        """
        n_refl = len(reflection_table)
        scale_param = self.parameters[0]
        
        # All reflections get the same scale factor
        scales = flex.double(n_refl, scale_param)
        
        # Derivatives: ∂scale_i/∂param_0 = 1 for all i
        derivatives = flex.double(flex.grid(n_refl, 1), 1.0)
        
        return scales, derivatives
    
    def update_reflection_data(self, reflection_table):
        """Update component with new reflection data if needed"""
        pass

class ResolutionDependentComponent(ScaleComponentBase):
    """Scale component that varies with resolution"""
    
    def __init__(self, active_parameter_manager, n_resolution_bins=10, d_min=1.0, d_max=50.0):
        super().__init__(active_parameter_manager)
        self.n_resolution_bins = n_resolution_bins
        self.d_min = d_min
        self.d_max = d_max
        
        # Initialize parameters (one per resolution bin)
        initial_params = flex.double([1.0] * n_resolution_bins)
        self.active_parameter_manager.add_parameters(initial_params)
        
        # Store bin edges
        import math
        log_d_min = math.log(d_min)
        log_d_max = math.log(d_max)
        self.log_d_edges = [log_d_min + i * (log_d_max - log_d_min) / n_resolution_bins 
                           for i in range(n_resolution_bins + 1)]
    
    @property
    def n_params(self):
        return self.n_resolution_bins
    
    @property
    def parameters(self):
        return self.active_parameter_manager.get_parameters()[:self.n_params]
    
    def calculate_scales_and_derivatives(self, reflection_table, block_id=None):
        """Calculate resolution-dependent scales"""
        import math
        
        # Get d-spacings
        if "d" not in reflection_table:
            raise ValueError("Reflection table must contain 'd' column for resolution-dependent scaling")
        
        d_spacings = reflection_table["d"]
        n_refl = len(d_spacings)
        
        scales = flex.double(n_refl)
        derivatives = flex.double(flex.grid(n_refl, self.n_params), 0.0)
        
        # Assign scales based on resolution bins
        for i, d_val in enumerate(d_spacings):
            if d_val <= 0:
                scales[i] = 1.0
                continue
                
            log_d = math.log(d_val)
            
            # Find appropriate bin
            bin_idx = 0
            for j in range(len(self.log_d_edges) - 1):
                if self.log_d_edges[j] <= log_d < self.log_d_edges[j + 1]:
                    bin_idx = j
                    break
            
            # Ensure bin_idx is valid
            bin_idx = max(0, min(bin_idx, self.n_params - 1))
            
            # Set scale and derivative
            scales[i] = self.parameters[bin_idx]
            derivatives[i, bin_idx] = 1.0
        
        return scales, derivatives

class CustomRelativeScalingModel(ScalingModelBase):
    """Custom scaling model for Module 3.S.3 relative scaling"""
    
    def __init__(self, configdict, is_scaled=False):
        super().__init__(configdict, is_scaled)
        self._components = {}
        
    def configure_components(self, reflection_table, experiment, params):
        """Configure scaling components based on data and parameters"""
        
        # Set up parameter manager
        self.active_parameter_manager = active_parameter_manager()
        
        # Add multiplicative component
        self._components["multiplicative"] = SimpleMultiplicativeComponent(
            self.active_parameter_manager, initial_scale=1.0
        )
        
        # Add resolution-dependent component if requested
        if hasattr(params, 'resolution_dependent') and params.resolution_dependent:
            self._components["resolution"] = ResolutionDependentComponent(
                self.active_parameter_manager, 
                n_resolution_bins=params.n_resolution_bins,
                d_min=params.d_min, 
                d_max=params.d_max
            )
        
        # Calculate d-spacings if needed
        if "resolution" in self._components and "d" not in reflection_table:
            # Add d-spacing calculation
            from xtalscale.cctbx import uctbx
            unit_cell = experiment.crystal.get_unit_cell()
            miller_indices = reflection_table["miller_index"]
            d_spacings = flex.double([unit_cell.d(hkl) for hkl in miller_indices])
            reflection_table["d"] = d_spacings
    
    @property
    def components(self):
        return list(self._components.values())
    
    def get_scales(self, reflection_table):
        """Calculate combined scale factors from all components"""
        if not self._components:
            return flex.double(len(reflection_table), 1.0)
        
        # Start with unit scales
        total_scales = flex.double(len(reflection_table), 1.0)
        
        # Multiply scales from all components
        for component in self.components:
            component_scales, _ = component.calculate_scales_and_derivatives(reflection_table)
            total_scales *= component_scales
        
        return total_scales
    
    def get_inverse_scales(self, reflection_table):
        """Calculate inverse scale factors"""
        scales = self.get_scales(reflection_table)
        return 1.0 / scales
