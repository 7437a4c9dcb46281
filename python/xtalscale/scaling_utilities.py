"""Geometry helpers of the spherical-harmonic absorption surface (DIALS ``scaling_utilities``).

* :func:`calc_crystal_frame_vectors` rotates the beam and scattered directions into the
  crystal frame (columns ``s0c``/``s1c``, spec §2.5 steps 1–3);
* :func:`align_axis_along_z` realigns them so the goniometer axis (lab x in DIALS's scaler
  factory) becomes z (step 4);
* :func:`sph_harm_table` evaluates the averaged real harmonics (step 5 and the "speed" table).

Also the sparse and harmonic helpers of DIALS's compiled ``dials_scaling_ext`` (spec §1.16;
re-exported there): :func:`row_multiply`, :func:`elementwise_square`, the lookup-grid helpers
and :func:`rotate_vectors_about_axis`.

:func:`absorption_frame_vectors` chains the first two with DIALS's alignment axis (1, 0, 0).
Per-reflection work runs in C++ (``xtalscale._core.components``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ._core import components as _kern
from ._lazy import LazyModule, is_scipy_sparse

if TYPE_CHECKING:
    import scipy.sparse as sp
else:
    sp = LazyModule("scipy.sparse")  # imported on first use: see _lazy

__all__ = [
    "calc_crystal_frame_vectors",
    "align_axis_along_z",
    "absorption_frame_vectors",
    "absorption_lookup_indices",
    "calc_theta_phi",
    "sph_harm_table",
    "sph_harm_values",
    "DIALS_ALIGNMENT_AXIS",
    "row_multiply",
    "elementwise_square",
    "calc_lookup_index",
    "create_sph_harm_table",
    "create_sph_harm_lookup_table",
    "calculate_harmonic_tables_from_selections",
    "rotate_vectors_about_axis",
]

#: The axis DIALS's scaler factory aligns along z before evaluating the harmonics.
DIALS_ALIGNMENT_AXIS = (1.0, 0.0, 0.0)


def _column(table: Any, name: str, width: int | None = None) -> np.ndarray:
    """A float64 column of a reflection table (or dict), with a KeyError naming it if absent."""
    try:
        present = name in table
    except TypeError:
        present = False
    if not present:
        raise KeyError(f"the reflection table has no column '{name}'")
    arr = np.asarray(table[name], dtype=np.float64)
    if width is not None and (arr.ndim != 2 or arr.shape[1] != width):
        raise ValueError(f"column '{name}' must hold {width}-vectors (got shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"column '{name}' must be finite")
    return arr


def _vec3(v: Any, name: str) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if a.size != 3 or not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be a finite 3-vector (got {v!r})")
    return a


def _mat3(m: Any, name: str) -> np.ndarray:
    a = np.asarray(m, dtype=np.float64).reshape(-1)
    if a.size != 9 or not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be a finite 3x3 matrix")
    return a.reshape(3, 3)


def _sample_to_source(beam: Any) -> np.ndarray:
    """Unit vector from the sample to the source (−ŝ0)."""
    for getter in ("get_sample_to_source_direction", "get_direction"):
        if hasattr(beam, getter):
            u = _vec3(getattr(beam, getter)(), f"beam.{getter}()")
            break
    else:
        u = -_vec3(beam.get_s0(), "beam.get_s0()")
    norm = np.linalg.norm(u)
    if norm == 0.0:
        raise ValueError("the beam direction must be non-zero")
    return u / norm


def calc_crystal_frame_vectors(reflection_table: Any, experiment: Any) -> Any:
    """Add the crystal-frame beam and scattered directions ``s0c`` and ``s1c``.

    With ``R = S · Rot(axis_datum, φ) · F`` (setting rotation S, fixed rotation F, scan angle
    ``φ`` of each reflection's z pixel coordinate), ``s0c = Rᵀ·u0`` for the sample-to-source
    unit vector u0 and ``s1c = Rᵀ·s1/|s1|`` (zero where |s1| = 0).

    Parameters
    ----------
    reflection_table : reflection table or dict
        Needs ``s1`` (n×3) and ``xyzobs.px.value`` (n×3).
    experiment : Experiment
        Needs ``beam``, ``goniometer`` and ``scan``.

    Returns
    -------
    The same table, with ``s0c`` and ``s1c`` (n×3 float64) set.

    Raises
    ------
    KeyError
        If ``s1`` or ``xyzobs.px.value`` is missing.
    ValueError
        If a column is not finite or the experiment lacks a goniometer/scan.
    """
    s0c, s1c = _kern.absorption_frame_vectors(**_frame_geometry(reflection_table, experiment),
                                              align_axis=np.array([0.0, 0.0, 1.0]))
    reflection_table["s0c"] = s0c
    reflection_table["s1c"] = s1c
    return reflection_table


def _frame_geometry(reflection_table: Any, experiment: Any) -> dict:
    """The keyword arguments of the C++ crystal-frame kernels (``absorption_frame_vectors``,
    ``absorption_lookup_indices``) but the alignment axis: the goniometer's axis, F and S, the
    sample-to-source direction, each reflection's s1 and its scan angle φ (radians)."""
    s1 = _column(reflection_table, "s1", 3)
    xyz = _column(reflection_table, "xyzobs.px.value", 3)
    gonio = getattr(experiment, "goniometer", None)
    scan = getattr(experiment, "scan", None)
    if gonio is None or scan is None:
        raise ValueError("calc_crystal_frame_vectors needs an experiment with a goniometer and a scan")
    phi = np.asarray(scan.get_angle_from_array_index(xyz[:, 2], deg=False), dtype=np.float64)
    return {"rotation_axis": _vec3(gonio.get_rotation_axis_datum(), "goniometer rotation axis"),
            "fixed_rotation": _mat3(gonio.get_fixed_rotation(), "fixed rotation"),
            "setting_rotation": _mat3(gonio.get_setting_rotation(), "setting rotation"),
            "sample_to_source": _sample_to_source(experiment.beam),
            "s1": s1, "phi": np.ascontiguousarray(np.broadcast_to(phi, (xyz.shape[0],)))}


def align_axis_along_z(alignment_axis: Sequence[float], vectors: Any) -> np.ndarray:
    """Rotate ``vectors`` so that ``alignment_axis`` points along +z.

    The rotation is about ``(u_y, −u_x, 0)`` by ``acos(u_z/|u|)``; for u = (1, 0, 0) this maps
    (x, y, z) → (−z, y, x). Vectors are returned unchanged if u is already along +z.

    Parameters
    ----------
    alignment_axis : 3-vector
    vectors : (n, 3) array_like

    Returns
    -------
    numpy.ndarray
        (n, 3) float64.
    """
    u = _vec3(alignment_axis, "alignment_axis")
    norm = np.linalg.norm(u)
    if norm == 0.0:
        raise ValueError("alignment_axis must be non-zero")
    v = np.ascontiguousarray(np.asarray(vectors, dtype=np.float64))
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vectors must have shape (n, 3) (got {v.shape})")
    if u[0] == 0.0 and u[1] == 0.0 and u[2] > 0.0:
        return v.copy()
    rot_axis = np.array([u[1], -u[0], 0.0])
    angle = float(np.arccos(u[2] / norm))
    if not np.any(rot_axis):  # u along −z: any perpendicular axis works
        rot_axis = np.array([1.0, 0.0, 0.0])
    return _kern.rotate_vectors_about_axis(rot_axis, v, np.full(v.shape[0], angle))


def absorption_frame_vectors(reflection_table: Any, experiment: Any,
                             alignment_axis: Sequence[float] = DIALS_ALIGNMENT_AXIS) -> tuple:
    """``(s0c, s1c)`` in the frame DIALS evaluates the absorption harmonics in.

    Runs :func:`calc_crystal_frame_vectors` (which sets the table columns) and then
    :func:`align_axis_along_z` with DIALS's axis (1, 0, 0), as DIALS's scaler factory does;
    the table's ``s0c``/``s1c`` columns are replaced by the aligned vectors.
    """
    s0c, s1c = _kern.absorption_frame_vectors(**_frame_geometry(reflection_table, experiment),
                                              align_axis=_vec3(alignment_axis, "alignment_axis"))
    reflection_table["s0c"] = s0c
    reflection_table["s1c"] = s1c
    return s0c, s1c


def absorption_lookup_indices(reflection_table: Any, experiment: Any, points_per_degree: int,
                              n_threads: int = 1,
                              alignment_axis: Sequence[float] = DIALS_ALIGNMENT_AXIS) -> tuple:
    """``(s0_lookup, s1_lookup)``: the lookup-grid indices of :func:`absorption_frame_vectors`'
    directions, computed in one C++ pass per reflection without storing the vectors (nor
    adding columns to the table). Equal to ``calc_lookup_index(calc_theta_phi(v), ppd)`` of
    those vectors, with θ = π mapped to the grid's last θ row."""
    return _kern.absorption_lookup_indices(**_frame_geometry(reflection_table, experiment),
                                           align_axis=_vec3(alignment_axis, "alignment_axis"),
                                           points_per_degree=int(points_per_degree),
                                           n_threads=max(1, int(n_threads)))


def calc_theta_phi(vectors: Any) -> np.ndarray:
    """(n, 2) polar angle θ ∈ [0, π] and azimuth φ ∈ [0, 2π) of (n, 3) vectors."""
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vectors must have shape (n, 3) (got {v.shape})")
    return _kern.calc_theta_phi(v)


def sph_harm_values(s0c: Any, s1c: Any, lmax: int) -> np.ndarray:
    """Dense (n_refl, lmax²+2·lmax) averaged real harmonics of the two directions."""
    return _kern.sph_harm_table(calc_theta_phi(s0c), calc_theta_phi(s1c), int(lmax))


def sph_harm_table(reflection_table: Any, lmax: int) -> sp.csc_matrix:
    """The exact harmonic table of DIALS: a sparse (n_params × n_refl) matrix.

    Parameters
    ----------
    reflection_table : reflection table or dict
        Needs the (aligned) crystal-frame columns ``s0c`` and ``s1c``.
    lmax : int
        Highest harmonic order (1..30).

    Returns
    -------
    scipy.sparse.csc_matrix
        Column j holds reflection j's harmonics; the values share memory with a dense
        row-major (n_refl × n_params) array, which :class:`SHScaleComponent` uses directly.
    """
    s0c = _column(reflection_table, "s0c", 3)
    s1c = _column(reflection_table, "s1c", 3)
    if s0c.shape != s1c.shape:
        raise ValueError("columns 's0c' and 's1c' must have the same length")
    return _harmonics_as_csc(sph_harm_values(s0c, s1c, lmax))


def _harmonics_as_csc(values: np.ndarray) -> sp.csc_matrix:
    """A dense row-major (n_refl × n_params) harmonic block as DIALS's (n_params × n_refl) CSC
    table, sharing the block's memory."""
    n, p = values.shape
    indices = np.tile(np.arange(p, dtype=np.int32), n)
    indptr = np.arange(0, n * p + 1, p, dtype=np.int64 if n * p >= 2**31 else np.int32)
    return sp.csc_matrix((values.reshape(-1), indices, indptr), shape=(p, n), copy=False)


def _compact_csr(m: Any, name: str) -> sp.csr_matrix:
    """A canonical float64 CSR copy of a sparse or dense matrix (duplicates summed, as compact())."""
    if is_scipy_sparse(m):
        out = sp.csr_matrix(m, dtype=np.float64, copy=True)
    elif hasattr(m, "as_dense_matrix"):
        out = sp.csr_matrix(np.asarray(m.as_dense_matrix(), dtype=np.float64))
    else:
        arr = np.asarray(m, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"{name} must be a 2-D matrix (got shape {arr.shape})")
        out = sp.csr_matrix(arr)
    out.sum_duplicates()
    return out


def row_multiply(m: Any, v: Any) -> sp.csr_matrix:
    """``result[i, j] = m[i, j] · v[i]``.

    Parameters
    ----------
    m : sparse matrix (n × k)
    v : (n,) array_like

    Returns
    -------
    scipy.sparse.csr_matrix
    """
    csr = _compact_csr(m, "m")
    vec = np.ascontiguousarray(np.asarray(v, dtype=np.float64))
    if vec.shape != (csr.shape[0],):
        raise ValueError(f"v must have one value per matrix row ({csr.shape[0]}), got shape {vec.shape}")
    data = _kern.row_multiply(csr.indptr, csr.data, vec)
    return sp.csr_matrix((data, csr.indices, csr.indptr), shape=csr.shape)


def elementwise_square(m: Any) -> sp.csr_matrix:
    """``result[i, j] = m[i, j]²`` as a CSR matrix."""
    csr = _compact_csr(m, "m")
    csr.data = csr.data * csr.data
    return csr


def calc_lookup_index(theta_phi: Any, points_per_degree: float) -> np.ndarray:
    """Grid index ``int(360·ppd·floor(θ·ppd·180/π) + floor(φ·ppd·180/π))`` of each (θ, φ).

    As in DIALS, θ = π gives an index one row past the end of the lookup table.
    """
    tp = np.asarray(theta_phi, dtype=np.float64)
    if tp.ndim != 2 or tp.shape[1] != 2:
        raise ValueError(f"theta_phi must have shape (n, 2) (got {tp.shape})")
    return _kern.calc_lookup_index(tp, float(points_per_degree))


def create_sph_harm_table(s0_theta_phi: Any, s1_theta_phi: Any, lmax: int) -> sp.csc_matrix:
    """Sparse (lmax²+2·lmax) × n table of averaged real harmonics of the two directions."""
    tp0 = np.asarray(s0_theta_phi, dtype=np.float64)
    tp1 = np.asarray(s1_theta_phi, dtype=np.float64)
    for name, tp in (("s0_theta_phi", tp0), ("s1_theta_phi", tp1)):
        if tp.ndim != 2 or tp.shape[1] != 2:
            raise ValueError(f"{name} must have shape (n, 2) (got {tp.shape})")
    return _harmonics_as_csc(_kern.sph_harm_table(tp0, tp1, int(lmax)))


def create_sph_harm_lookup_table(lmax: int, points_per_degree: int) -> list:
    """One array per harmonic of the values on the (θ, φ) grid with ``points_per_degree``."""
    from .components import create_sph_harm_lookup_table as _create  # noqa: PLC0415

    return _create(lmax, points_per_degree)


def calculate_harmonic_tables_from_selections(s0_selection: Any, s1_selection: Any,
                                              coefficients_list: Sequence[Any]) -> tuple:
    """Average two lookups per reflection: ``(table[s0] + table[s1]) / 2`` for each harmonic.

    Returns
    -------
    (list of numpy arrays, scipy.sparse.csr_matrix)
        One array of n values per harmonic, and the same values as an n × n_param matrix.
    """
    columns = [np.asarray(c, dtype=np.float64) for c in coefficients_list]
    if not columns:
        raise ValueError("coefficients_list must hold at least one table")
    if len({c.shape for c in columns}) != 1 or columns[0].ndim != 1:
        raise ValueError("coefficients_list must hold 1-D tables of equal length")
    table = np.ascontiguousarray(np.stack(columns, axis=1))
    i0 = np.asarray(s0_selection, dtype=np.int64)
    i1 = np.asarray(s1_selection, dtype=np.int64)
    values = _kern.harmonics_from_lookup(i0, i1, table, table.shape[1])
    return [values[:, k].copy() for k in range(values.shape[1])], sp.csr_matrix(values)


def rotate_vectors_about_axis(rot_axis: Any, vectors: Any, angles: Any) -> np.ndarray:
    """Rotate each vector about ``rot_axis`` (normalised here) by its angle in radians."""
    axis = np.asarray(rot_axis, dtype=np.float64).reshape(-1)
    if axis.size != 3:
        raise ValueError(f"rot_axis must hold exactly one 3-vector (got {np.shape(rot_axis)})")
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vectors must have shape (n, 3) (got {v.shape})")
    return _kern.rotate_vectors_about_axis(axis, v, np.asarray(angles, dtype=np.float64))
