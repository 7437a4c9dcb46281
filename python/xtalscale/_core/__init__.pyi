# Type stubs for the compiled extension xtalscale._core (one .pyi per submodule beside this one).
from . import components as components
from . import smoothers as smoothers

__version__: str
