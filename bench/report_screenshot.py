"""Write the insulin merge report and a PNG screenshot of it (headless Chromium).

Run: ``PYTHONPATH=python python bench/report_screenshot.py [output_dir]``; look at the PNG to
check the report reads well. Prints the browser's render check too.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSULIN = ROOT / "tests" / "data" / "mtz_insulin_dials_aimless" / \
    "insulin_dials_scaled_unmerged.mtz.gz"
CYS = ROOT / "tests" / "data" / "dials_l_cysteine_4_sweeps_scaled"


def main(out: Path) -> None:
    from xtalscale.cli import main as cli
    from xtalscale.report.browser import render_in_browser, screenshot

    out.mkdir(parents=True, exist_ok=True)
    for name, inputs in (("insulin", [str(INSULIN)]),
                         ("l_cysteine", [str(CYS / "scaled_30.expt"),
                                         str(CYS / "scaled_30.refl")])):
        html = out / f"{name}.html"
        cli(["merge", *inputs, f"output.mtz={out / (name + '.mtz')}", f"output.html={html}"])
        print(name, render_in_browser(html))
        print("wrote", screenshot(html, out / f"{name}.png"))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("report_screenshots"))
