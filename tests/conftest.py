import gzip
import json
import os
from pathlib import Path

import pytest

# `make test` runs two xdist workers on a 2-core machine: one compute thread each (torch, and every
# subprocess it starts: notebook kernels, the CLI, torchrun), instead of two each fighting over two cores.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

from microlm.stages import load_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _runs_per_worker(tmp_path_factory):
    """Under ``pytest -n`` (make test) each worker writes stage folders of the default run root
    (the notebooks' ``runs/smoke``) to its own folder, so two workers never share one."""
    if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("MICROLM_RUNS"):
        os.environ["MICROLM_RUNS"] = str(tmp_path_factory.getbasetemp() / "runs")
    yield


@pytest.fixture(scope="session", autouse=True)
def _own_probe_cache(tmp_path_factory):
    """The precision probe (``precision: auto``) is measured and cached in a folder of the test run's own:
    a probe taken beside the other worker's tests is contended, and is not this machine's answer for
    the user's courses (``~/.cache/microlm``).  Both workers share it, so they agree."""
    if not os.environ.get("MICROLM_CACHE"):
        base = tmp_path_factory.getbasetemp()
        shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
        os.environ["MICROLM_CACHE"] = str(shared / "microlm-cache")
    yield


@pytest.fixture
def tmp_cfg(tmp_path):
    """A smoke config writing under tmp_path, running in-process."""

    def make(**overrides):
        base = {"run_dir": str(tmp_path / "runs"), "corpus.workers": 0}
        base.update(overrides)
        return load_config("smoke", base)

    return make


def write_jsonl(path: Path, texts, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return path


ZH = [
    "北京是中华人民共和国的首都，也是全国的政治中心和文化中心，拥有三千多年的建城史。",
    "长江是中国第一大河，全长约六千三百公里，流经青海、西藏、四川、云南等十一个省级行政区。",
    "机器学习是人工智能的一个分支，它研究如何让计算机从数据中自动学习规律并做出预测。",
    "今天天气很好，我们一起去公园散步，看到很多人在放风筝，孩子们玩得非常开心。",
    "这家餐厅的菜味道不错，服务也很周到，就是价格稍微有点贵，下次还会再来的。",
    "唐诗是中国古典诗歌的高峰，李白和杜甫是其中最著名的两位诗人，被后人称为李杜。",
]


@pytest.fixture
def zh_docs():
    return list(ZH)


def real_data_available() -> bool:
    return bool(os.environ.get("MICROLM_DATA"))


CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="session")
def chat_tok(tmp_path_factory):
    """A 420-id byte-level BPE (qwen2 pattern, ChatML specials) trained on ZH + chat role words."""
    from microlm.tokenizer import Tokenizer, train_bpe

    d = tmp_path_factory.mktemp("chattok")
    (d / "t.txt").write_text("<|endoftext|>".join(ZH * 10 + ["user assistant system 你好 谢谢"] * 10),
                             encoding="utf-8")
    vocab, merges = train_bpe(d / "t.txt", 420, CHAT_SPECIALS, workers=1, pattern="qwen2")
    return Tokenizer(vocab, merges, CHAT_SPECIALS, pattern="qwen2")
