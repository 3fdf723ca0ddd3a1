"""Small matplotlib helpers for the notebooks."""

from __future__ import annotations

__all__ = ["cjk_font"]

_CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Micro Hei", "WenQuanYi Zen Hei",
                 "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "AR PL UMing CN", "Droid Sans Fallback")


def cjk_font() -> str | None:
    """Use an installed font that has Chinese glyphs, if there is one; return its family name.

    Without one (the default on a bare Linux machine), callers label axes with token positions
    instead of characters, rather than drawing empty boxes.
    """
    import matplotlib
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    for fam in _CJK_FAMILIES:
        if fam in names:
            matplotlib.rcParams["font.sans-serif"] = [fam, *matplotlib.rcParams["font.sans-serif"]]
            matplotlib.rcParams["axes.unicode_minus"] = False
            return fam
    return None
