"""Pictures for reports: generic line plots and heatmaps, each as a PNG (matplotlib, optional)
and as one self-contained interactive HTML file (no network).

    from residtap.report import line_png, line_html
    line_html("sweep.html", ["embed", "layers.0"], {"accuracy": [0.5, 0.9]}, ylabel="accuracy")
"""

from residtap.report.plots import heatmap_html, heatmap_png, line_html, line_png

__all__ = ["heatmap_html", "heatmap_png", "line_html", "line_png"]
