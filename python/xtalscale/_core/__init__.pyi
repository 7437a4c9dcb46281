# Type stubs for the compiled extension xtalscale._core (one .pyi per submodule beside this one).
from . import components as components
from . import smoothers as smoothers
from . import refl as refl
from . import grouping as grouping
from . import fit as fit
from . import job as job
from . import model_block as model_block
from . import merge as merge
from . import stats as stats

__version__: str

def huge_pages() -> bool: ...
def set_huge_pages(enabled: bool) -> None: ...
def simd_level() -> int: ...
def set_simd_level(level: int) -> int: ...
