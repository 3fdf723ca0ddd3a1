"""Training LoRA adapters on a task the SFT model has not been taught (``run_lora``: what the ``lora``
stage, A7, runs).

The task is a derived one from ``microlm/data/tasks.py`` that is kept out of SFT (``lora.task``,
default ``orgs``: list the organisation names in a People's Daily sentence), split by paragraph hash
into train and held-out — the same on a fresh machine and with the data bundle.  Only the adapters
train (0.83 % of the 31.7M reference at r=8 on q/k/v/o); the report gives held-out exact match and
entity F1 of the SFT model before and after the adapter beside the two baselines (the empty answer
and a lookup of entity strings seen in training), and the adapter is saved in PEFT's format
(``adapter/``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from microlm.data.sft import SFTBatches, encode_records
from microlm.data.tasks import task_examples
from microlm.errors import MicroLMError
from microlm.io import write_json
from microlm.model import TransformerLM
from microlm.model.checkpoint import load_checkpoint
from microlm.model.lora import LoRAConfig, apply_lora, save_adapter
from microlm.tokenizer import Tokenizer
from microlm.train.curves import loss_fields, plot_curves, read_metrics
from microlm.train.dist import DistInfo, distributed
from microlm.train.sft import SFTEvaluator, baseline_scores, score_task
from microlm.train.trainer import Trainer

__all__ = ["lora_task", "run_lora"]


def lora_task(lc, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, held-out)`` conversations of ``lc.task`` (``lc``: the ``lora`` section)."""
    train = task_examples(lc.task, "train", lc.train_records, seed)
    held = task_examples(lc.task, "heldout", lc.eval_records, seed)
    if len(held) < lc.eval_records:
        raise MicroLMError(f"only {len(held)} held-out {lc.task} examples, fewer than lora.eval_records="
                           f"{lc.eval_records}")
    return train, held


def run_lora(lc, mc, base_dir: Path, tok_dir: Path, out_dir: Path, *, seed: int, resume: bool = False,
             progress: bool = True, stop_after: int | None = None, dist: DistInfo | None = None) -> dict:
    """Adapters (``lc``: the ``lora`` section, its loop ``lc.train``) on the SFT model in ``base_dir``."""
    tc = lc.train
    with distributed(tc.device, dist) as dist:
        tok = Tokenizer.load(tok_dir)
        train_recs, held = lora_task(lc, seed)
        train_ex, train_rep = encode_records(tok, train_recs, tc.seq_len)
        if not train_ex:
            raise MicroLMError(f"no usable lora training conversations: {train_rep.to_dict()} "
                               f"(a longer lora.train.seq_len may help)")
        val_ex, _ = encode_records(tok, held, tc.seq_len)
        torch.manual_seed(seed)
        model = TransformerLM(mc)
        load_checkpoint(base_dir / "ckpt", model, expect={"model": mc.to_dict()}, restore_rng=False)
        before = score_task(model, tok, held) if dist.is_main else None  # base weights, even on --resume
        lcfg = LoRAConfig(r=lc.r, alpha=lc.alpha, dropout=lc.dropout, targets=list(lc.targets))  # without task sizes
        params = apply_lora(model, lcfg)
        micro = tc.micro_batch_size or max(1, tc.batch_size // dist.world_size)
        trainer = Trainer(model, tc, out_dir, batches=SFTBatches(train_ex, tc.batch_size, tok.eos_id, seed),
                          dist=dist, seed=seed, progress=progress,
                          run_meta={"model": mc.to_dict(), "stage": "lora", "lora": lcfg.__dict__},
                          evaluate=SFTEvaluator(SFTBatches(val_ex, micro, tok.eos_id, seed), tc.eval_batches,
                                                dist.device))
        base_eval = trainer.evaluate(trainer.raw_model) if dist.is_main and not resume else None
        t0 = time.time()
        result = trainer.fit(resume=resume, stop_after=stop_after)
        report: dict = {}
        if dist.is_main:
            after = score_task(trainer.raw_model, tok, held)
            save_adapter(trainer.raw_model, lcfg, out_dir / "adapter", base_model_name=str(base_dir))
            train, evals = read_metrics(out_dir)
            report = {"base": str(base_dir), "params": params, "steps": result["steps"],
                      "seconds_this_run": round(time.time() - t0, 1), "train_data": train_rep.to_dict(),
                      "task": lc.task, "heldout": len(held), "before": before, "after": after,
                      "baselines": baseline_scores(train_recs, held),
                      **loss_fields(train, evals, base_eval)}
            write_json(out_dir / "report.json", report)
            plot_curves(out_dir, train, evals)
        return report


