"""Stage B3: the IE LoRA — trainable share from the architecture alone, the two engines step for step,
a killed run that resumes, and the bad inputs (one-line errors)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from microlm.errors import ConfigError, MicroLMError
from microlm.ie.lora_data import ChatEncoder, encode_chats
from microlm.ie.render import render_example
from microlm.ie.train_lora import (
    ALL_LINEAR,
    QWEN25_15B,
    attach_microlm,
    attach_peft,
    copy_microlm_init_to_peft,
    load_base,
    load_tokenizer,
    lockstep_losses,
    lora_share,
    train_ie_lora,
)
from microlm.model import TransformerLM
from microlm.model.config import ModelConfig
from microlm.model.hf_export import export_hf
from microlm.stages import load_config
from microlm.train.curves import read_metrics

from .conftest import REPO

RELS = ["出生地点", "毕业院校", "国籍", "职业"]
PEOPLE = [("李白", "碎叶城"), ("杜甫", "巩县"), ("苏轼", "眉山"), ("王维", "祁县"), ("白居易", "新郑"), ("韩愈", "河阳")]



def _train_run(cfg, *args, **kw) -> dict:
    """One ie_lora run as the stage starts it (the run's section, the seed, ie_data's cutoff)."""
    return train_ie_lora(cfg.ie_lora, *args, seed=cfg.seed, data_cutoff=cfg.ie_data.cutoff_tokens, **kw)

def ie_lines(n: int) -> list[dict]:
    out = []
    for i in range(n):
        head, tail = PEOPLE[i % len(PEOPLE)]
        text = f"{head}生于{tail}。" * (1 + i % 3)
        inst = json.dumps({"instruction": "抽取关系", "schema": RELS[: 1 + i % 4], "input": text}, ensure_ascii=False)
        gold = {r: ([{"subject": head, "object": tail}] if r == "出生地点" else []) for r in RELS[: 1 + i % 4]}
        ex = {"id": f"r{i}", "record_id": f"r{i}", "cate": "人物", "source": "test", "instruction": inst,
              "output": json.dumps(gold, ensure_ascii=False)}
        out.append(render_example(ex))
    return out


@pytest.fixture
def tiny_llama(tmp_path, chat_tok):
    """A tiny MicroLM exported as a Llama folder (the cpu profile's base, in miniature)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=chat_tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                      max_seq_len=1024)
    model = TransformerLM(cfg)
    return export_hf(model, chat_tok, tmp_path / "base")


def test_the_trainable_share_of_qwen25_15b_is_pinned_from_its_config_alone():
    share = lora_share(QWEN25_15B, 8, ALL_LINEAR)  # the meta device: no weights anywhere
    assert share["trainable"] == 28 * 8 * (2 * (1536 + 1536) + 2 * (1536 + 256) + 3 * (1536 + 8960))
    assert share["base"] == 1_543_714_304  # Qwen2.5-1.5B, tied embeddings
    assert round(share["percent"], 2) == 0.59
    assert set(share["per_module"]) == set(ALL_LINEAR)


def _train(model, lines, tok, steps, tmp):
    exs, _ = encode_chats(ChatEncoder(tok), lines, 1024)
    assert len(exs) == len(lines)
    return lockstep_losses(model, exs, tok.pad_token_id, steps, tmp, lr=3e-2, min_lr=3e-3)


def test_the_two_engines_train_the_same_adapter_step_for_step(tiny_llama, tmp_path):
    """Pipeline A's from-scratch LoRA on TransformerLM and PEFT on transformers' Llama, from the same
    initial A/B on the same batches: the same losses for 25 steps (within 1e-4)."""
    tok = load_tokenizer(str(tiny_llama))
    lines = ie_lines(24)
    ours, lcfg, rep = attach_microlm(tiny_llama, 4, 8.0, 0.0, ALL_LINEAR)
    theirs = attach_peft(load_base(str(tiny_llama)), 4, 8.0, 0.0, ALL_LINEAR)
    assert copy_microlm_init_to_peft(ours, theirs) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert n_ours == theirs.get_nb_trainable_parameters()[0] == rep["adapter_params"]
    a = _train(ours, lines, tok, 25, tmp_path / "a")
    b = _train(theirs, lines, tok, 25, tmp_path / "b")
    assert len(a) == len(b) == 25 and a[-1] < a[0] - 0.2  # it learns
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)


def _cfg(tmp_path, **extra):
    return load_config("smoke", {"run_dir": str(tmp_path / "runs"), "ie_lora.r": 4, "ie_lora.alpha": 8.0,
                                 "ie_lora.train.batch_size": 4, "ie_lora.train.max_steps": 6,
                                 "ie_lora.train.ckpt_interval": 2, "ie_lora.train.eval_interval": 3,
                                 "ie_lora.train.log_interval": 1, "ie_lora.train.warmup_steps": 1,
                                 "ie_lora.val_examples": 8, **extra})


def _data(tmp_path):
    d = tmp_path / "ie_data"
    d.mkdir()
    for split, n in (("train", 20), ("val", 8)):
        (d / f"06_{split}.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in ie_lines(n)),
                                             encoding="utf-8")
    return d


@pytest.mark.parametrize("engine", ["peft", "microlm"])
def test_a_killed_run_resumes_and_its_adapter_loads(tiny_llama, tmp_path, engine):
    from peft import PeftModel

    cfg = _cfg(tmp_path)
    data, out = _data(tmp_path), tmp_path / "run"
    run = {"name": "t", "base": "hf", "engine": engine}
    _train_run(cfg, run, str(tiny_llama), data, out, progress=False, stop_after=3)
    state = json.loads((out / "ckpt" / "state.json").read_text())
    assert state["step"] == 2  # checkpoints every 2 steps: the kill at 3 loses one step
    from safetensors.torch import load_file

    saved = load_file(out / "ckpt" / "model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # the adapters only, not the base
    rep = _train_run(cfg, run, str(tiny_llama), data, out, progress=False, resume=True)
    assert rep["steps"] == 6
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the lines after the checkpoint were dropped and redone
    merged = PeftModel.from_pretrained(load_base(str(tiny_llama)), out / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    base_logits = load_base(str(tiny_llama))(ids).logits
    assert not torch.allclose(merged(ids).logits, base_logits)  # the adapter changes the model
    assert (out / "adapter" / "tokenizer.json").is_file() and (out / "curves.png").is_file()


def test_bad_bases_and_settings_are_one_line_errors(tiny_llama, tmp_path):
    import shutil

    with pytest.raises(MicroLMError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(MicroLMError, match="missing tokenizer.json"):
        load_tokenizer(str(broken))
    no_template = tmp_path / "no_template"
    shutil.copytree(tiny_llama, no_template)
    conf = json.loads((no_template / "tokenizer_config.json").read_text())
    conf.pop("chat_template")
    (no_template / "tokenizer_config.json").write_text(json.dumps(conf))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(MicroLMError, match="no chat template"):
        load_tokenizer(str(no_template))
    with pytest.raises(MicroLMError, match="match no linear layer"):
        attach_peft(load_base(str(tiny_llama)), 4, 8.0, 0.0, ["q_proj", "qkv"])
    quant = tmp_path / "quant"
    shutil.copytree(tiny_llama, quant)
    conf = json.loads((quant / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quant / "config.json").write_text(json.dumps(conf))
    with pytest.raises(MicroLMError, match="quantized"):
        load_base(str(quant))
    with pytest.raises(ConfigError, match="never adapted"):
        load_config("smoke", {"ie_lora.targets": ["q_proj", "lm_head"]})
    with pytest.raises(ConfigError, match="engine"):
        load_config("smoke", {"ie_lora.runs": [{"name": "a", "base": "hf", "engine": "trl"}]})
    other = tmp_path / "other_template"
    shutil.copytree(tiny_llama, other)
    conf = json.loads((other / "tokenizer_config.json").read_text())
    conf["chat_template"] = conf["chat_template"].replace("<|im_start|>", "<|im_start|> ")
    (other / "tokenizer_config.json").write_text(json.dumps(conf))
    cfg = _cfg(tmp_path)
    with pytest.raises(MicroLMError, match="differs from the one ie_data rendered"):
        _train_run(cfg, {"name": "t", "base": "x", "engine": "peft"}, str(other), _data(tmp_path),
                      tmp_path / "o", progress=False)


def tiny_qwen2(folder, tokenizer_dir=None, chat_tok=None):
    """A randomly initialised Qwen2ForCausalLM with Qwen2.5's architecture features (q/k/v bias, GQA,
    tied embeddings, rope theta 1e6) and the real Qwen2.5 tokenizer (or, without the data bundle, the
    MicroLM tokenizer: the same ChatML template)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from microlm.tokenizer.hf import write_hf_tokenizer

    if tokenizer_dir is None:
        write_hf_tokenizer(chat_tok, folder)
        tokenizer_dir = folder
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    conf = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
                       max_position_embeddings=2048, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    Qwen2ForCausalLM(conf).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_peft_trains_a_tiny_qwen2_with_the_real_qwen_tokenizer(tmp_path, chat_tok):
    from .conftest import real_data_available
    from .test_ie_lora_data import _tokenizers

    toks = _tokenizers(tmp_path / "toks", chat_tok) if real_data_available() else {}
    qwen_dir = tmp_path / "toks" / "qwen" if toks else None
    base = tiny_qwen2(tmp_path / "qwen2", qwen_dir, chat_tok)
    model = load_base(str(base))
    assert model.config.model_type == "qwen2" and model.model.layers[0].self_attn.q_proj.bias is not None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    cfg = _cfg(tmp_path)
    rep = _train_run(cfg, {"name": "q", "base": "x", "engine": "peft"}, str(base), _data(tmp_path),
                        tmp_path / "q", progress=False)
    assert rep["steps"] == 6 and rep["final_val_loss"] < rep["base_val_loss"]
    assert rep["params"]["trainable"] == 2 * 4 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))
    assert rep["train_data"]["dropped_over_cutoff"] == 0 and 0 < rep["trained_token_share"] < 1
    if real_data_available():
        assert len(load_tokenizer(str(base))) > 150_000  # the real Qwen2.5 vocabulary


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_merged_folder_is_verified_and_complete(tiny_llama, tmp_path, chat_tok, arch):
    from transformers import AutoModelForCausalLM

    from microlm.ie.merge import merge_adapter

    base = tiny_llama if arch == "llama" else tiny_qwen2(tmp_path / "qwen2", None, chat_tok)
    cfg = _cfg(tmp_path, **{"ie_lora.train.lr": 0.05})
    _train_run(cfg, {"name": "m", "base": "x", "engine": "peft"}, str(base), _data(tmp_path), tmp_path / "m",
                  progress=False)
    tok = load_tokenizer(str(base))
    enc = ChatEncoder(tok)
    prompts = [enc.prompt_ids(line["messages"]) for line in ie_lines(5)]
    rep = merge_adapter(str(base), tmp_path / "m" / "adapter", tmp_path / "merged", prompts=prompts,
                        max_new_tokens=8, card={"lora": {"r": 4, "alpha": 8.0, "dropout": 0.05, "targets": ["q_proj"]},
                                                "license": "apache-2.0"})
    assert rep["logits_max_abs_diff"] <= 1e-4 and rep["greedy_identical"] == 5 and not rep["missing_files"]
    assert rep["chat_template_equal"] and rep["eos_includes_im_end"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    if arch == "qwen2":  # tied stays tied: one tensor on disk, the flag kept
        from safetensors import safe_open

        assert rep["tied_embeddings"] and merged.config.tie_word_embeddings
        with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in set(f.keys())
        assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    base_model = AutoModelForCausalLM.from_pretrained(base)
    ids = torch.tensor([prompts[0]])
    assert not torch.allclose(merged(ids).logits, base_model(ids).logits, atol=1e-4)  # the adapter is in it
    card = (tmp_path / "merged" / "README.md").read_text()
    assert str(base) in card and "r = 4, alpha = 8.0" in card and "apache-2.0" in card


def test_a_merge_that_fails_its_checks_writes_nothing(tiny_llama, tmp_path, chat_tok, monkeypatch):
    from microlm.ie import merge as export

    cfg = _cfg(tmp_path)
    _train_run(cfg, {"name": "m", "base": "x", "engine": "peft"}, str(tiny_llama), _data(tmp_path),
                  tmp_path / "m", progress=False)
    adapter = tmp_path / "m" / "adapter"
    # another base: the differing fields are listed
    other = tiny_qwen2(tmp_path / "other", None, chat_tok)
    with pytest.raises(MicroLMError, match="another base model: .*model_type"):
        export.merge_adapter(str(other), adapter, tmp_path / "x", prompts=[[5, 6]])
    # a verification that fails (here: a tolerance no merge meets) leaves no folder behind
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "old.txt").write_text("the previous merge")
    with pytest.raises(MicroLMError, match="merge verification failed: merged logits differ"):
        export.merge_adapter(str(tiny_llama), adapter, tmp_path / "merged", prompts=[[5, 6, 7]], logits_atol=-1.0)
    assert [p.name for p in (tmp_path / "merged").iterdir()] == ["old.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.tmp")]


def test_the_stages_train_every_run_and_merge_each(tiny_llama, tmp_path, chat_tok):
    """``ie_lora`` trains each configured run into its own folder (both engines on one base), skips
    finished runs on ``--resume``; ``ie_merged`` merges each into ``<name>/`` verified on the eval prompts."""
    from microlm.stages import StageRun
    from microlm.stages import ie_lora as train_lora
    from microlm.stages import ie_merged as export

    runs = [{"name": "peft", "base": "hf", "engine": "peft"}, {"name": "scratch", "base": "hf", "engine": "microlm"}]
    cfg = _cfg(tmp_path, **{"ie_lora.runs": runs, "ie_merged.max_new_tokens": 8})
    data = _data(tmp_path)
    (data / "06_eval_prompts.jsonl").write_text("".join(
        json.dumps({**x, "messages": x["messages"][:2]}, ensure_ascii=False) + "\n" for x in ie_lines(3)))
    opts = {"resume": False, "stop_after": None}
    lora = StageRun("ie_lora", cfg, tmp_path / "ie_lora", {"hf": tiny_llama, "ie_data": data}, progress=False,
                    options=opts)
    m = train_lora.build(lora)
    assert set(m["runs"]) == {"peft", "scratch"}
    assert m["runs"]["peft"]["trainable_percent"] == m["runs"]["scratch"]["trainable_percent"]
    assert all(r["final_val_loss"] < r["base_val_loss"] for r in m["runs"].values())
    stamp = (tmp_path / "ie_lora" / "peft" / "report.json").stat().st_mtime_ns
    assert train_lora.build(StageRun("ie_lora", cfg, tmp_path / "ie_lora", lora.up, progress=False,
                                     options={"resume": True, "stop_after": None}))["runs"].keys() == m["runs"].keys()
    assert (tmp_path / "ie_lora" / "peft" / "report.json").stat().st_mtime_ns == stamp  # finished: not retrained
    merged = export.build(StageRun("ie_merged", cfg, tmp_path / "ie_merged",
                                   {"hf": tiny_llama, "ie_data": data, "ie_lora": tmp_path / "ie_lora"},
                                   progress=False, options={}))
    for name in ("peft", "scratch"):  # the from-scratch engine's adapter is PEFT's format: it merges the same way
        assert merged["runs"][name]["greedy_identical"] == 3
        assert (tmp_path / "ie_merged" / name / "model.safetensors").is_file()


WORKER = Path(__file__).with_name("ie_lora_worker.py")


def _worker(cfg_sets: dict, base, data, out, engine="peft", *extra, torchrun: int = 0):
    cmd = [str(WORKER), json.dumps(cfg_sets), str(base), str(data), str(out), engine, *extra]
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun), *cmd]
    return [sys.executable, *cmd]


def _losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out)[0]]


def test_two_processes_give_the_losses_of_one_with_the_same_global_batch(tiny_llama, tmp_path, engine="peft"):
    """torchrun --nproc_per_node 2 (gloo) vs one process vs one process accumulating 2 micro-batches:
    the loss of each step is the summed answer-token loss over the global batch ÷ its trained tokens,
    and each length-grouped batch is dealt to the ranks the same way every time — the same curve.  (PEFT;
    the from-scratch engine is pipeline A's trainer, whose DDP test is in test_pretrain.py.)"""
    sets = {"run_dir": str(tmp_path / "runs"), "ie_lora.r": 4, "ie_lora.alpha": 8.0, "ie_lora.dropout": 0.0,
            "ie_lora.train.batch_size": 4, "ie_lora.train.max_steps": 8, "ie_lora.train.lr": 0.02,
            "ie_lora.train.warmup_steps": 0, "ie_lora.train.precision": "fp32", "ie_lora.train.log_interval": 1,
            "ie_lora.train.eval_interval": 8, "ie_lora.train.ckpt_interval": 8, "ie_lora.val_examples": 4,
            "ie_lora.group": 2}
    data = _data(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = {k: tmp_path / k for k in ("one", "accum", "two")}
    for k, cmd in (("one", _worker(sets, tiny_llama, data, outs["one"], engine)),
                   ("accum", _worker({**sets, "ie_lora.train.micro_batch_size": 2}, tiny_llama, data, outs["accum"],
                                     engine)),
                   ("two", _worker(sets, tiny_llama, data, outs["two"], engine, torchrun=2))):
        r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (k, (r.stdout + r.stderr)[-3000:])
    one, accum, two = (_losses(outs[k]) for k in ("one", "accum", "two"))
    assert len(one) == len(two) == len(accum) == 8 and one[-1] < one[0]
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 2e-4, (one, two)
    assert max(abs(a - b) for a, b in zip(one, accum, strict=True)) < 2e-4, (one, accum)


def _ckpt_step(state: Path) -> int:
    try:
        return json.loads(state.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def _kill_after_checkpoint(cmd: list[str], state: Path, at: int = 2, timeout: float = 900) -> int:
    """Start ``cmd``, SIGKILL it once its checkpoint ``state`` says step >= ``at`` (synchronised on
    what it wrote, never on time); the step the killed run's last checkpoint holds."""
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and _ckpt_step(state) < at:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()[-2000:]  # still running: the kill lands mid-run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return _ckpt_step(state)


def test_a_run_killed_with_sigkill_resumes_and_its_adapter_loads(tiny_llama, tmp_path):
    from peft import PeftModel

    sets = {"run_dir": str(tmp_path / "runs"), "ie_lora.r": 4, "ie_lora.alpha": 8.0,
            "ie_lora.train.batch_size": 4, "ie_lora.train.max_steps": 60, "ie_lora.train.ckpt_interval": 2,
            "ie_lora.train.eval_interval": 30, "ie_lora.train.log_interval": 1, "ie_lora.val_examples": 4}
    data, out = _data(tmp_path), tmp_path / "run"
    killed_at = _kill_after_checkpoint(_worker(sets, tiny_llama, data, out), out / "ckpt" / "state.json")
    assert 2 <= killed_at < 60 and not (out / "report.json").exists()
    r = subprocess.run(_worker(sets, tiny_llama, data, out, "peft", "--resume"), cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["steps"] == 60
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert steps == list(range(1, 61))  # lines after the last checkpoint dropped and redone, none twice
    model = PeftModel.from_pretrained(load_base(str(tiny_llama)), out / "adapter")
    assert model(torch.tensor([[5, 6, 7]])).logits.isfinite().all()


@pytest.mark.parametrize("arch", ["qwen2-peft", "microlm-scratch"])
def test_the_chunked_answer_loss_equals_the_full_vocabulary_loss(tiny_llama, tmp_path, chat_tok, arch):
    """Only the trained positions go through the output head, a few rows at a time, each chunk
    recomputed in the backward pass: the same summed loss and the same adapter gradients as the
    full-vocabulary cross-entropy over all logits."""
    from microlm.ie.lora_data import SummedTokenLoss, _trunk

    if arch == "qwen2-peft":
        base = tiny_qwen2(tmp_path / "qwen2", None, chat_tok)
        model = attach_peft(load_base(str(base)), 4, 8.0, 0.0, ALL_LINEAR)
    else:
        base = tiny_llama
        model, _, _ = attach_microlm(tiny_llama, 4, 8.0, 0.0, ALL_LINEAR)
    for p in (p for n, p in model.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(p, std=0.5)  # B = 0 at init would make every adapter gradient but B's vanish
    tok = load_tokenizer(str(base))
    exs, _ = encode_chats(ChatEncoder(tok), ie_lines(6), 1024)
    from microlm.ie.lora_data import LengthGroupedBatches

    x, y, _ = LengthGroupedBatches(exs, 6, tok.pad_token_id, 0).collate(range(6), 1.0)
    # 7 rows per chunk: several chunks and a ragged last one
    chunked, full = SummedTokenLoss(model, chunk_rows=7), SummedTokenLoss(model, chunked=False)
    assert chunked._trunk is not None and full._trunk is None and _trunk(model) is not None
    grads = []
    for wrapped in (full, chunked):
        model.zero_grad()
        loss = wrapped.summed(x, y)
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (lf, gf), (lc, gc) = grads
    assert (y[:, 1:] != -100).sum() > 7 and lc == pytest.approx(lf, rel=1e-5)
    worst = {k: float((gf[k] - gc[k]).abs().max() / gf[k].abs().max().clamp_min(1e-12)) for k in gf}
    assert set(gf) == set(gc) and max(worst.values()) < 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    assert any(gf[k].abs().sum() > 0 for k in gf if "lora_A" in k)


def test_batched_verification_equals_one_prompt_at_a_time(tmp_path, chat_tok):
    """ie_merged's and serve_smoke's checks run in batches (right padding for logits, left padding for
    generation): the same greedy answers and the same largest logit difference as one prompt at a time."""
    from microlm.infer.greedy import greedy_ids, max_logit_diff

    base = tiny_qwen2(tmp_path / "qwen2", None, chat_tok)
    tok = load_tokenizer(str(base))
    model, other = load_base(str(base)).eval(), load_base(str(base)).eval()
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.add_(0.05 * torch.randn_like(other.model.layers[0].mlp.up_proj.weight))
    enc = ChatEncoder(tok)
    prompts = [enc.prompt_ids(x["messages"]) for x in ie_lines(7)]
    assert len({len(p) for p in prompts}) > 2  # prompts of several lengths: the padding matters
    batched = greedy_ids(model, tok, prompts, 10, batch_size=4)
    assert batched == [greedy_ids(model, tok, [p], 10, batch_size=1)[0] for p in prompts]
    assert all(len(a) >= 1 for a in batched)
    pad = tok.pad_token_id
    (d,) = max_logit_diff(model, [other], prompts, pad_id=pad, batch_size=3)
    single = max(max_logit_diff(model, [other], [p], pad_id=pad, batch_size=1)[0] for p in prompts)
    assert d > 1e-3 and d == pytest.approx(single, rel=1e-4)
    assert max_logit_diff(model, [model], prompts, pad_id=pad, batch_size=3) == [0.0]


def test_the_merged_folder_keeps_the_base_dtype_and_reports_the_cast(tmp_path, chat_tok):
    """A bf16 base merges in fp32 (gated: ≤ logits_atol), is saved in bf16 (half the bytes) and the
    cast's logit change and greedy agreement are reported, not gated."""
    import shutil

    from transformers import AutoModelForCausalLM

    from microlm.ie.merge import merge_adapter

    base = tiny_qwen2(tmp_path / "qwen2", None, chat_tok)
    m = AutoModelForCausalLM.from_pretrained(base)
    shutil.rmtree(base / "model.safetensors", ignore_errors=True)
    m.to(torch.bfloat16).save_pretrained(base)  # the published dtype of Qwen2.5: bf16
    cfg = _cfg(tmp_path, **{"ie_lora.train.lr": 0.05, "ie_lora.train.precision": "fp32"})
    _train_run(cfg, {"name": "m", "base": "x", "engine": "peft"}, str(base), _data(tmp_path), tmp_path / "m",
                  progress=False)
    tok = load_tokenizer(str(base))
    prompts = [ChatEncoder(tok).prompt_ids(x["messages"]) for x in ie_lines(5)]
    rep = merge_adapter(str(base), tmp_path / "m" / "adapter", tmp_path / "merged", prompts=prompts, max_new_tokens=6,
                        greedy_prompts=3)
    assert rep["dtype"] == "bfloat16" and rep["logits_prompts"] == 5 and rep["greedy_prompts"] == 3
    assert rep["logits_max_abs_diff"] <= 1e-4 and rep["greedy_identical"] == 3
    assert 0 < rep["cast_logits_max_abs_diff"] < 1.0 and 0 <= rep["cast_greedy_identical"] <= 3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")
    assert merged.dtype == torch.bfloat16
    size = sum(p.stat().st_size for p in (tmp_path / "merged").glob("*.safetensors"))
    assert size < 0.6 * sum(p.numel() * 4 for p in merged.parameters())  # 2 bytes per weight, not 4


def test_each_ie_lora_run_is_its_own_record_reused_resumed_or_retrained(tiny_llama, tmp_path):
    """A finished run is reused only when its own fingerprint (entry, base, settings, upstream) matches;
    a changed setting retrains it (never a report that says r=2 beside an r=4 adapter); a run stopped
    part-way resumes from its checkpoint; --force retrains."""
    from microlm.stages import StageRun
    from microlm.stages import ie_lora as train_lora

    runs = [{"name": "a", "base": "hf", "engine": "peft"}]
    data = _data(tmp_path)
    up = {"hf": tiny_llama, "ie_data": data}

    def build(cfg, force=False, **opts):
        return train_lora.build(StageRun("ie_lora", cfg, tmp_path / "ie_lora", up, progress=False,
                                         options={"resume": False, "stop_after": None, **opts}, force=force))

    cfg4 = _cfg(tmp_path, **{"ie_lora.runs": runs})
    assert build(cfg4, stop_after=3) is None  # stopped part-way: not finished
    rep = build(cfg4)  # resumes from its step-2 checkpoint
    steps = [json.loads(x)["step"] for x in (tmp_path / "ie_lora" / "a" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6] and rep["runs"]["a"]["train_examples"] == 20
    report = tmp_path / "ie_lora" / "a" / "report.json"
    stamp = report.stat().st_mtime_ns
    build(cfg4)
    assert report.stat().st_mtime_ns == stamp  # the same run: reused
    cfg2 = _cfg(tmp_path, **{"ie_lora.runs": runs, "ie_lora.r": 2})
    build(cfg2)
    adapter = json.loads((tmp_path / "ie_lora" / "a" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and json.loads(report.read_text())["params"]["trainable"] < rep["runs"]["a"].get(
        "trainable", 10**9) and report.stat().st_mtime_ns != stamp
    stamp = report.stat().st_mtime_ns
    build(cfg2, force=True)
    assert report.stat().st_mtime_ns != stamp
    assert (tmp_path / "ie_lora" / "a" / "base_eval.json").is_file()


def test_resume_refuses_a_run_made_with_other_settings_and_a_plain_run_retrains_it(tiny_llama, tmp_path):
    """``--resume`` on a finished r=4 run asked for r=2 is one line before anything is touched (the
    probe: it exited 0, trained nothing and wrote r=2 beside an r=4 adapter); the registry's own
    resume of an interrupted run and ``--force`` are not refused; without ``--resume`` it retrains."""
    from microlm.stages import StageRun
    from microlm.stages import ie_lora as stage

    runs = [{"name": "a", "base": "hf", "engine": "peft"}]
    up = {"hf": tiny_llama, "ie_data": _data(tmp_path)}

    def run(cfg, force=False, auto=False, **opts):
        return StageRun("ie_lora", cfg, tmp_path / "ie_lora", up, progress=False,
                        options={"resume": False, "stop_after": None, **opts}, force=force, auto_resume=auto)

    cfg4, cfg2 = _cfg(tmp_path, **{"ie_lora.runs": runs}), _cfg(tmp_path, **{"ie_lora.runs": runs, "ie_lora.r": 2})
    stage.build(run(cfg4))
    stage.preflight(run(cfg4, resume=True))  # the same settings: nothing to refuse (kept as it is)
    adapter = tmp_path / "ie_lora" / "a" / "adapter" / "adapter_config.json"
    before = adapter.read_bytes()
    with pytest.raises(MicroLMError, match=r"run 'a': --resume, but .*ie_lora/a/ckpt was made with another config"):
        stage.preflight(run(cfg2, resume=True))
    assert adapter.read_bytes() == before
    stage.preflight(run(cfg2, resume=True, force=True))
    stage.preflight(run(cfg2, resume=True, auto=True))
    assert stage.build(run(cfg2)) is not None and json.loads(adapter.read_text())["r"] == 2


def test_a_plain_rerun_after_a_kill_keeps_the_finished_run_and_resumes_the_killed_one(tiny_llama, tmp_path):
    """Two runs; kill -9 while the second one trains (synchronised on its checkpoint), then the stage
    again with no option: the first run's record is kept untouched, the second goes on from its
    checkpoint (every step once) and the stage finishes."""
    sets = {"run_dir": str(tmp_path / "runs"), "ie_lora.r": 4, "ie_lora.alpha": 8.0,
            "ie_lora.runs": [{"name": "a", "base": "hf", "engine": "peft"}, {"name": "b", "base": "hf", "engine": "peft"}],
            "ie_lora.train.batch_size": 4, "ie_lora.train.max_steps": 40, "ie_lora.train.ckpt_interval": 2,
            "ie_lora.train.eval_interval": 20, "ie_lora.train.log_interval": 1, "ie_lora.val_examples": 4}
    data, out = _data(tmp_path), tmp_path / "ie_lora"
    killed_at = _kill_after_checkpoint(_worker(sets, tiny_llama, data, out, "peft", "--stage"),
                                       out / "b" / "ckpt" / "state.json")
    assert 2 <= killed_at < 40 and not (out / "b" / "report.json").exists()
    first = (out / "a" / "report.json").stat().st_mtime_ns
    r = subprocess.run(_worker(sets, tiny_llama, data, out, "peft", "--stage"), cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(metrics["runs"]) == {"a", "b"}
    assert (out / "a" / "report.json").stat().st_mtime_ns == first  # kept, not retrained
    steps = [json.loads(x)["step"] for x in (out / "b" / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert steps == list(range(1, 41))  # resumed: lines after the last checkpoint redone, none twice
    assert json.loads((out / "b" / "report.json").read_text())["useful_tokens_per_s"] is None  # a resumed run
