"""Child process of test_fuzz_readers.py: feeds mutated files to the readers.

Not a test module (no ``test_`` prefix). Usage::

    python fuzz_readers_child.py SPEC.json

SPEC: {"seed": int, "budget_s": float, "workdir": str, "memory_factor": float,
       "slack_mb": int, "sources": [[kind, reader, path], ...]}. ``kind`` groups sources
whose files are spliced together. One line per outcome is printed (``CASE`` before each
read, so a hang names its input; ``BAD`` for a failure); exit status 1 on any failure.
"""
from __future__ import annotations

import gzip
import json
import os
import resource
import sys
import time

import numpy as np


def _readers():
    from xtalscale.experiments import ExperimentList
    from xtalscale.io.mtz import read_merged_mtz, read_unmerged_mtz
    from xtalscale.io.refl import read_refl
    from xtalscale.io.xds import read_xds_hkl

    return {"refl": read_refl, "expt": ExperimentList.from_file,
            "mtz": lambda p: read_unmerged_mtz(p), "merged_mtz": read_merged_mtz,
            "xds": lambda p: read_xds_hkl(p).table}


def _complete(result) -> str | None:
    """None if ``result`` is a complete object, else what is wrong."""
    table = getattr(result, "table", result)
    if hasattr(table, "is_consistent"):
        if not table.is_consistent():
            return "inconsistent column lengths"
        return None
    if hasattr(table, "miller_index"):  # MergedMtz
        n = len(table.miller_index)
        short = [k for k, v in table.columns.items() if len(v) != n]
        return f"merged columns {short} shorter than {n} rows" if short else None
    return None if hasattr(result, "__len__") else f"unexpected result {type(result).__name__}"


def _mutate(rng, raw: bytes, others: list[bytes]) -> tuple[str, bytes]:
    how = rng.integers(0, 3)
    if how == 0:
        return "truncate", raw[: int(rng.integers(0, len(raw)))]
    if how == 1:
        data = bytearray(raw)
        for _ in range(int(rng.integers(1, 5))):
            pos = int(rng.integers(0, len(data)))
            data[pos] ^= 1 << int(rng.integers(0, 8))
        return "bitflip", bytes(data)
    other = others[int(rng.integers(0, len(others)))]
    return "splice", raw[: int(rng.integers(0, len(raw)))] + other[int(rng.integers(0, len(other))):]


def _vm_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def main() -> int:
    spec = json.load(open(sys.argv[1]))
    readers = _readers()
    sources = [(kind, reader, open(path, "rb").read(), path)
               for kind, reader, path in spec["sources"]]
    # warm up every reader on its original file (lazy imports, caches), then cap memory
    largest = 0
    for _, reader, raw, path in sources:
        assert _complete(readers[reader](path)) is None, path
        size = len(gzip.decompress(raw)) if raw[:2] == b"\x1f\x8b" else len(raw)
        largest = max(largest, size)
    limit = _vm_bytes() + int(spec["memory_factor"] * largest) + (spec["slack_mb"] << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(f"LIMIT {limit >> 20} MB (largest input {largest >> 10} kB)", flush=True)
    by_kind: dict[str, list[bytes]] = {}
    for kind, _, raw, _ in sources:
        by_kind.setdefault(kind, []).append(raw)
    failures = 0
    per_source = spec["budget_s"] / len(sources)
    for s_index, (kind, reader, raw, path) in enumerate(sources):
        counts = {"error": 0, "loaded": 0}
        end = time.monotonic() + per_source
        case = 0
        suffix = os.path.basename(path)
        while time.monotonic() < end:
            rng = np.random.default_rng([spec["seed"], s_index, case])
            if raw[:2] == b"\x1f\x8b" and rng.random() < 0.7:
                # most mutations of a gzipped file only fail its CRC: mutate the content
                # and compress again, so the MTZ layer behind gzip is exercised too
                how, data = _mutate(rng, gzip.decompress(raw),
                                    [gzip.decompress(x) for x in by_kind[kind]])
                how, data = how + "+gzip", gzip.compress(data, compresslevel=1)
            else:
                how, data = _mutate(rng, raw, by_kind[kind])
            target = os.path.join(spec["workdir"], f"case_{suffix}")
            with open(target, "wb") as fh:
                fh.write(data)
            print(f"CASE {suffix} {case} {how}", flush=True)
            try:
                problem = _complete(readers[reader](target))
            except (ValueError, OSError) as exc:
                problem = None
                counts["error"] += 1
                if os.path.basename(target) not in str(exc):
                    problem = f"{type(exc).__name__} not naming the file: {str(exc)[:200]}"
            except BaseException as exc:  # noqa: BLE001 - everything else is a defect
                problem = f"{type(exc).__name__}: {str(exc)[:300]}"
            else:
                counts["loaded"] += 1
            if problem is not None:
                failures += 1
                print(f"BAD {suffix} case {case} ({how}): {problem}", flush=True)
            case += 1
        print(f"DONE {suffix} {case} cases {counts}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
