"""Files of a probe sweep: sweep.json and the held-out metric by site as HTML and PNG.

    from residtap.probes.plot import write_files
    write_files(result, "sweep/")     # result: residtap.probes.sweep.sweep(...); returns the paths

The sweep (residtap.probes.sweep) returns data; the command line calls this module to write it.
The plot is one line per probe kind over the sites (the probe, the difference-of-means baseline
when there is one) and the majority class as a dashed reference, drawn by residtap.report.plots:
the HTML always, the PNG when matplotlib is installed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from residtap.report.plots import line_html, line_png

if TYPE_CHECKING:
    from residtap.probes.sweep import SweepResult

log = logging.getLogger(__name__)


def write_files(result: SweepResult, folder: str | os.PathLike[str], *, png: bool = True
                ) -> dict[str, Path]:
    """Write sweep.json, sweep.html and (with matplotlib, when `png`) sweep.png into `folder`;
    returns {"json", "html"[, "png"]: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "sweep.json"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    series: dict[str, list[float | None]] = {
        f"probe ({result.kind})": [s.test.get(result.metric) for s in result.sites]}
    if any(s.baseline is not None for s in result.sites):
        series["difference of means"] = [(s.baseline or {}).get(result.metric)
                                         for s in result.sites]
    if result.chance is not None:
        series["majority class"] = [result.chance] * len(result.sites)
    labels = dict(x=result.site_names, series=series, xlabel="site",
                  ylabel=f"held-out {result.metric}",
                  title=f"{result.label_column}: {result.metric} by site",
                  ylim=(0.0, 1.02) if result.metric == "accuracy" else None,
                  dashed=("majority class",))
    split = result.split
    note = (f"Best site: {result.best_site} ({result.metric} "
            f"{result.best.test[result.metric]:.4f}). Split: {split['source']}, "
            f"{split['train_texts']} training and {split['test_texts']} test texts.")
    paths["html"] = line_html(folder / "sweep.html", **labels, note=note)
    if png:
        try:
            paths["png"] = line_png(folder / "sweep.png", **labels)
        except ImportError as err:
            log.warning("sweep.png not written: %s", err)
    return paths
