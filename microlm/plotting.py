"""Small matplotlib helpers: a Chinese font for figures.

The font is Noto Sans SC (SIL Open Font License 1.1), shipped as a file inside the pip package
``pylopdf-fonts-zh-cn`` (the ``course`` extra pins it). Nothing is downloaded and no system font
is looked up, so every machine that installed the course draws the same glyphs. A notebook needs
one line before its first Chinese plot::

    from microlm.plotting import use_cjk_font; use_cjk_font()
"""

from __future__ import annotations

import dataclasses
import warnings
from importlib import resources
from pathlib import Path

__all__ = ["CJK_FONT_FILE", "CJK_FONT_PACKAGE", "cjk_font", "cjk_font_path", "use_cjk_font"]

CJK_FONT_PACKAGE = "pylopdf_fonts_zh_cn"  # import name of the pip package pylopdf-fonts-zh-cn
CJK_FONT_FILE = "NotoSansSC-Regular.otf"  # Noto Sans SC, the Simplified Chinese subset of Noto Sans CJK
_FALLBACK = "DejaVu Sans"  # matplotlib's own font: glyphs the CJK font lacks fall back to it

_warned = False


def cjk_font_path() -> Path | None:
    """The CJK font file inside the installed package, or None when the package is not installed."""
    try:
        f = resources.files(CJK_FONT_PACKAGE) / CJK_FONT_FILE
    except ModuleNotFoundError:
        return None
    path = Path(str(f))  # the package installs as plain files (a wheel, not a zip)
    return path if path.is_file() else None


def use_cjk_font() -> str | None:
    """Register the packaged CJK font with matplotlib and make it the first sans-serif family.

    Returns the family name ("Noto Sans SC"), or None (with one warning per process) when the font
    package is missing; callers then keep labels that need no CJK glyphs. Call it before a figure's
    text is made (a text takes ``font.family`` when it is created).

    matplotlib resolves the generic "sans-serif" to one font and falls back glyph by glyph only
    along ``font.family``, so the family list becomes ``["sans-serif", "DejaVu Sans"]``: Noto Sans
    SC draws everything it has (Chinese, Latin, digits), DejaVu Sans the rest (the byte-level
    tokens' "Ġ", say). The package ships only the Regular face, so bold and italic text draws
    upright Regular: the face is also entered under the other weights and styles, which keeps such
    text (a bold title in Chinese) in this font, not in a Latin face that would leave boxes.

    Idempotent and cheap: the font is registered once per font manager, and each call only (re)sets
    the rcParams (so it survives ``matplotlib.rcdefaults()`` or a style sheet between calls).
    """
    global _warned
    import matplotlib
    from matplotlib import font_manager

    path = cjk_font_path()
    if path is None:
        if not _warned:
            _warned = True
            warnings.warn(f"no CJK font: install the course extra (pip package {CJK_FONT_PACKAGE.replace('_', '-')}); "
                          "figures keep labels without Chinese characters", RuntimeWarning, stacklevel=2)
        return None
    key = str(path)
    fm = font_manager.fontManager
    if not any(e.fname == key for e in fm.ttflist):  # register once per font manager
        fm.addfont(key)
        regular = next(e for e in fm.ttflist if e.fname == key)
        fm.ttflist.extend(dataclasses.replace(regular, style=style, weight=weight)
                          for style in ("normal", "italic", "oblique") for weight in range(100, 1000, 100)
                          if (style, weight) != (regular.style, regular.weight))
        if hasattr(fm, "_findfont_cached"):  # forget earlier look-ups, as addfont does
            fm._findfont_cached.cache_clear()
    family = font_manager.FontProperties(fname=key).get_name()
    rest = [f for f in matplotlib.rcParams["font.sans-serif"] if f not in (family, _FALLBACK)]
    matplotlib.rcParams["font.sans-serif"] = [family, _FALLBACK, *rest]
    matplotlib.rcParams["font.family"] = ["sans-serif", _FALLBACK]  # glyph-by-glyph fallback to DejaVu Sans
    matplotlib.rcParams["axes.unicode_minus"] = False  # draw "-" rather than U+2212
    return family


cjk_font = use_cjk_font  # the older name, kept for the notebooks that import it
