"""What the plot tests check of a figure and of the PNG it is saved to."""

from matplotlib.image import imread

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, figsize_inches):
    """A PNG at ``path`` whose pixel size is the figure's at the plots' 110 dpi."""
    assert path.exists() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = imread(path).shape[:2]
    assert (width, height) == (round(figsize_inches[0] * 110), round(figsize_inches[1] * 110))


def line_labels(ax):
    """The labels of the lines drawn on ``ax``."""
    return [line.get_label() for line in ax.get_lines()]
