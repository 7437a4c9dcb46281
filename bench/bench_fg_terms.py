"""The matrix-free f+g of a physical model term by term: g (evaluate_scales), the target kernel
(functional_and_scale_gradient) and the transposed product (∂g/∂p)ᵀ·∂f/∂g, in ns/observation,
for all three terms (lean scale smoother, lean B-decay smoother, lmax-4 float32 harmonics) and
each alone. ``--threads`` sets n_threads of the model's calls; ``--physical`` also prints
bench_fit's physical-model line."""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fit import best_time, physical_components, physical_like, physical_model_f_g  # noqa: E402

from xtalscale import _core  # noqa: E402
from xtalscale.components import ComponentModelBlock  # noqa: E402

core_fit = _core.fit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-obs", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--physical", action="store_true")
    a = ap.parse_args()
    rng = np.random.default_rng(11)
    offsets, inten, w, _, _ = physical_like(a.n_obs, 1, 8, np.random.default_rng(7))
    n = inten.size
    scale, decay, sh = physical_components(n, rng)
    empty = (np.zeros(n + 1, np.int64), np.zeros(0, np.int32), np.zeros(0))
    nt = a.threads
    for comps, name in (([scale, decay, sh], "all"), ([scale], "scale"), ([decay], "decay"), ([sh], "sh")):
        block = ComponentModelBlock(comps)
        g = block.evaluate_scales(nt)
        f, dfdg, _ = core_fit.functional_and_scale_gradient(offsets, inten, w, [(g, *empty, 0, 0, None)])
        ts = best_time(lambda b=block: b.evaluate_scales(nt), 5)
        tt = best_time(lambda g=g: core_fit.functional_and_scale_gradient(
            offsets, inten, w, [(g, *empty, 0, 0, None)], n_threads=nt), 5)
        tp = best_time(lambda b=block, c=dfdg: b.transpose_product(c, nt), 5)
        print(f"{name:6s} g {ts / n * 1e9:6.1f}  target {tt / n * 1e9:6.1f}  transpose {tp / n * 1e9:6.1f} ns/obs"
              f"  ({nt} thread(s))")
    if a.physical:
        physical_model_f_g(offsets, inten, w, np.random.default_rng(11))


if __name__ == "__main__":
    main()
