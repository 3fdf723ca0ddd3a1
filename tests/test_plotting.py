"""Chinese in figures: the packaged Noto Sans SC is found, registered, and draws real glyphs."""

import importlib.metadata
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font

from microlm import plotting

TEXT = "预训练损失"  # the test characters: a title as the course draws it
FAMILY = "Noto Sans SC"


@pytest.fixture(autouse=True)
def _rc():
    """Each test's rcParams changes end with the test."""
    with matplotlib.rc_context():
        yield


def _glyph_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "missing from font" in str(w.message)]


def _draw(tmp_path: Path, name: str) -> tuple[Path, list[str]]:
    """A figure with Chinese in the title, axis labels, ticks and legend, saved as PNG; returns the
    file and the missing-glyph warnings that drawing it raised."""
    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    ax.plot([0, 1, 2], [3.0, 2.0, 1.5], label="训练集")
    ax.plot([0, 1, 2], [3.2, 2.4, 2.0], label="验证集")
    ax.set_title(TEXT)
    ax.set_xlabel("步数 (step)")
    ax.set_ylabel("损失 -1.5")
    ax.set_xticks([0, 1, 2], ["一", "二", "三"])
    ax.text(0.1, 2.6, "粗体 bold", weight="bold")  # no bold or italic face: drawn in the Regular one
    ax.text(0.1, 2.3, "斜体 italic", style="italic")
    ax.text(0.1, 2.0, "ĠGPT分词 ⟨s⟩")  # a byte-level token: "Ġ" and "⟨⟩" are not in Noto Sans SC, DejaVu Sans draws them
    ax.legend()
    out = tmp_path / name
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fig.savefig(out, dpi=80)
    return out, _glyph_warnings(record)


def test_font_file_comes_from_the_installed_package():
    path = plotting.cjk_font_path()
    assert path is not None, "pylopdf-fonts-zh-cn (the course extra) is not installed"
    assert path.is_file() and path.suffix == ".otf"
    dist = importlib.metadata.distribution("pylopdf-fonts-zh-cn")
    pkg_dir = Path(dist.locate_file(plotting.CJK_FONT_PACKAGE)).resolve()
    assert path.resolve().parent == pkg_dir  # inside the package's own folder ...
    parts = path.resolve().parts  # ... of an installed distribution, not a system font folder
    assert "site-packages" in parts or "dist-packages" in parts
    assert not any(p in str(path.resolve()) for p in ("/usr/share/fonts", "/usr/local/share/fonts", "/.fonts"))
    assert any(str(f).endswith(plotting.CJK_FONT_FILE) for f in dist.files or ())  # and the wheel's RECORD lists it
    assert dist.version == "0.1.1"


def test_font_has_glyphs_for_chinese_and_latin():
    font = FT2Font(str(plotting.cjk_font_path()))
    assert font.family_name == FAMILY
    for ch in TEXT + "训练验证集步数一二三中文，。" + "Aa0-":
        assert font.get_char_index(ord(ch)) != 0, ch


def test_use_cjk_font_registers_once_and_puts_family_first():
    path = str(plotting.cjk_font_path())
    assert plotting.use_cjk_font() == FAMILY
    assert plotting.use_cjk_font() == FAMILY  # idempotent
    assert plotting.cjk_font() == FAMILY  # the older name the notebooks import
    assert sum(e.fname == path for e in font_manager.fontManager.ttflist) >= 1
    n = len(font_manager.fontManager.ttflist)
    plotting.use_cjk_font()
    assert len(font_manager.fontManager.ttflist) == n  # no second registration
    sans = matplotlib.rcParams["font.sans-serif"]
    assert sans[0] == FAMILY and sans.count(FAMILY) == 1
    assert "DejaVu Sans" in sans  # the Latin fallback stays
    assert matplotlib.rcParams["axes.unicode_minus"] is False
    assert matplotlib.rcParams["font.family"] == ["sans-serif", "DejaVu Sans"]  # the glyph-by-glyph fallback
    for weight, style in (("bold", "normal"), ("normal", "italic"), ("semibold", "oblique")):
        prop = font_manager.FontProperties(family=["sans-serif"], weight=weight, style=style)
        assert font_manager.findfont(prop, fallback_to_default=False) == path, (weight, style)
    assert font_manager.findfont(font_manager.FontProperties(family=["sans-serif"]), fallback_to_default=False) == path


def test_chinese_figure_renders_without_missing_glyphs(tmp_path):
    assert plotting.use_cjk_font() == FAMILY
    out, missing = _draw(tmp_path, "zh.png")
    assert missing == []
    assert out.stat().st_size > 0


def test_without_the_font_the_same_figure_has_missing_glyphs(tmp_path):
    """The control for the test above: with matplotlib's default font the check does fire."""
    matplotlib.rcParams["font.sans-serif"] = ["DejaVu Sans"]
    _, missing = _draw(tmp_path, "boxes.png")
    assert any(f"Glyph {ord('预')} " in m for m in missing), missing


def _ink(ch: str) -> np.ndarray:
    fig = Figure(figsize=(0.6, 0.6), dpi=60)
    FigureCanvasAgg(fig)
    fig.text(0.5, 0.5, ch, fontsize=24, ha="center", va="center")
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., 0] < 128


def test_characters_draw_as_distinct_glyphs_not_boxes():
    """A missing glyph draws as the same box for every character; real glyphs differ."""
    assert plotting.use_cjk_font() == FAMILY
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        inks = [_ink(ch) for ch in TEXT]
    assert _glyph_warnings(record) == []
    assert all(i.any() for i in inks)
    assert all(not np.array_equal(a, b) for k, a in enumerate(inks) for b in inks[k + 1:])


def test_missing_package_returns_none_with_one_warning(monkeypatch):
    monkeypatch.setattr(plotting, "CJK_FONT_PACKAGE", "microlm_no_such_font_package")
    monkeypatch.setattr(plotting, "_warned", False)
    before = list(matplotlib.rcParams["font.sans-serif"])
    with pytest.warns(RuntimeWarning, match="no CJK font") as record:
        assert plotting.use_cjk_font() is None
        assert plotting.use_cjk_font() is None
    assert len([w for w in record if "no CJK font" in str(w.message)]) == 1
    assert matplotlib.rcParams["font.sans-serif"] == before


def test_stage_plots_use_the_font(tmp_path):
    """The stages' own plotting code turns the font on: loss curves, and the IE evaluation's topic
    heatmap whose tick labels are Chinese topic names."""
    from microlm.ie.evaluate import write_plots
    from microlm.train.curves import plot_curves

    matplotlib.rcdefaults()
    assert plot_curves(tmp_path, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}], []).is_file()
    assert matplotlib.rcParams["font.sans-serif"][0] == FAMILY

    matplotlib.rcdefaults()
    topics = ["人物", "地理位置", "组织"]
    model = {"parse_rate": 0.9, "schema_rate": 0.8, "f1": 0.5, "relaxed_f1": 0.6,
             "interval": {"f1": (0.4, 0.6), "parse_rate": (0.8, 1.0)},
             "by_topic": {t: {"f1": 0.3 + 0.1 * k} for k, t in enumerate(topics)}}
    report = {"order": ["base", "lora"], "prompts": 3, "models": {"base": model, "lora": model}}
    rows = [{"model": m, "new_tokens": 10 + k, "seconds": 0.1 * k} for m in ("base", "lora") for k in range(3)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        names = write_plots(report, rows, tmp_path)
    assert _glyph_warnings(record) == []
    assert matplotlib.rcParams["font.sans-serif"][0] == FAMILY
    assert all((tmp_path / n).is_file() for n in names)
