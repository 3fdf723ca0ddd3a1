"""The SFT stage (A6): held-out file kept out, assistant-only loss falls, exact resume, CLI."""

import gzip
import json

from microlm import stages
from microlm.stages import load_config
from microlm.train.curves import read_metrics

from .test_pretrain import data_dir, overrides  # noqa: F401  (module fixture reused)

QA = [("你是谁？", "我是小模型。"), ("你叫什么？", "我叫小模型。"), ("北京在哪里？", "北京在中国。"),
      ("长江长吗？", "长江很长。"), ("今天天气好吗？", "今天天气很好。")]


def sft_root(tmp_path):
    root = tmp_path / "data"
    (root / "sft").mkdir(parents=True)
    with gzip.open(root / "sft" / "train.jsonl.gz", "wt", encoding="utf-8") as f:
        for k in range(300):
            q, a = QA[k % len(QA)]
            f.write(json.dumps({"conversations": [{"role": "user", "content": q},
                                                  {"role": "assistant", "content": a}]}, ensure_ascii=False) + "\n")
        f.write('{"conversations": [{"role": "user", "content": "no answer"}]}\n')
    with gzip.open(root / "sft" / "belle_eval_set.jsonl.gz", "wt", encoding="utf-8") as f:
        for q, a in QA:
            f.write(json.dumps({"question": q, "std_answer": a}, ensure_ascii=False) + "\n")
    return root


def sft_cfg(run_dir, root, **extra):
    o = overrides(run_dir, **{"data.root": str(root), "sft.train.max_steps": 30, "sft.train.seq_len": 48,
                              "sft.train.batch_size": 8, "sft.train.lr": 0.003, "sft.train.log_interval": 1, "sft.train.eval_interval": 10,
                              "sft.train.ckpt_interval": 10, "sft.data.max_records": None, "sft.data.val_records": 5,
                              "sft.data.show_answers": 2, "sft.data.tasks": [], **extra})
    return load_config("smoke", o)


def test_sft_trains_on_assistant_tokens_and_keeps_the_heldout_file_out(data_dir, tmp_path):  # noqa: F811
    cfg = sft_cfg(data_dir, sft_root(tmp_path))
    stages.build("pretrain", cfg, progress=False)
    out = stages.build("sft", cfg, progress=False, out_dir=tmp_path / "sft")
    rep = json.loads((out / "report.json").read_text())
    assert rep["train_data"]["records"] == 301  # the belle file is not in the training set
    assert rep["train_data"]["drops"] == {"no_assistant_turn": 1}
    assert rep["val_data"]["kept"] == 5
    assert rep["final_val_loss"] < rep["first_val_loss"] - 0.3
    assert len(rep["answers"]) == 2 and all(a["before"] is not None for a in rep["answers"])
    assert any("belle_eval_set" in f for f in rep["inputs"])
    m = stages.read_manifest(out)
    assert m["stage"] == "sft" and m["metrics"]["kept"] == 300


def test_sft_resume_is_exact(data_dir, tmp_path):  # noqa: F811
    root = sft_root(tmp_path)
    cfg = sft_cfg(data_dir, root)
    stages.build("pretrain", cfg, progress=False)
    stages.build("sft", cfg, progress=False, out_dir=tmp_path / "ref")
    stages.build("sft", cfg, progress=False, out_dir=tmp_path / "cut", stop_after=10)
    stages.build("sft", cfg, progress=False, out_dir=tmp_path / "cut", resume=True)
    ref, _ = read_metrics(tmp_path / "ref")
    got, _ = read_metrics(tmp_path / "cut")
    assert [(r["step"], r["loss"]) for r in got] == [(r["step"], r["loss"]) for r in ref]


def test_lora_stage_trains_only_adapters_and_saves_a_loadable_adapter(data_dir, tmp_path):  # noqa: F811
    import torch

    from microlm.model import TransformerLM
    from microlm.model.checkpoint import load_checkpoint
    from microlm.model.lora import LoRAConfig, apply_lora, load_adapter

    cfg = sft_cfg(data_dir, sft_root(tmp_path), **{"lora.train.max_steps": 12, "lora.train.seq_len": 256,
                                                    "model.max_seq_len": 256, "lora.train.batch_size": 4,
                                                    "lora.train_records": 64, "lora.eval_records": 8})
    stages.build("pretrain", cfg, progress=False)
    stages.build("sft", cfg, progress=False)
    out = stages.build("lora", cfg, progress=False)
    rep = json.loads((out / "report.json").read_text())
    assert rep["params"]["trainable_params"] == rep["params"]["adapter_params"] > 0
    assert rep["task"] == "orgs" and rep["heldout"] == 8
    for sc in (rep["before"], rep["after"], *rep["baselines"].values()):
        assert sc["n"] == 8 and 0.0 <= sc["f1"] <= 1.0 and 0.0 <= sc["exact_match"] <= 1.0
    assert rep["baselines"]["empty"]["f1"] == 0.0 and rep["baselines"]["lookup"]["f1"] > 0.5

    sft_model = TransformerLM(cfg.model)
    load_checkpoint(cfg.run_path / "sft" / "ckpt", sft_model, restore_rng=False)
    trained = TransformerLM(cfg.model)  # what the stage trained: base + adapters, from its checkpoint
    apply_lora(trained, LoRAConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, targets=list(cfg.lora.targets)))
    load_checkpoint(out / "ckpt", trained, restore_rng=False)
    sft_w = dict(sft_model.named_parameters())
    for n, p in trained.named_parameters():
        if "lora_" not in n:  # only adapters trained: the base weights are still the SFT weights
            assert torch.equal(p, sft_w[n.replace(".base.", ".")]), n
    rebuilt = TransformerLM(cfg.model)  # SFT checkpoint + the saved PEFT-format adapter
    load_checkpoint(cfg.run_path / "sft" / "ckpt", rebuilt, restore_rng=False)
    load_adapter(rebuilt, out / "adapter")
    x = torch.randint(0, 400, (1, 16))
    assert torch.allclose(rebuilt.eval()(x)[0], trained.eval()(x)[0], atol=1e-6)
