"""Full-parameter SFT of the pretrained model on ChatML conversations (``run_sft``: what the ``sft``
stage, A6, runs).

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
import xxhash

from microlm.data.sft import SFTBatches, embedded_sft_records, encode_records, read_sft_file
from microlm.data.tasks import baseline_answers, entity_scores, format_answer, parse_entities, task_examples
from microlm.errors import MicroLMError
from microlm.infer.generate import generate_text
from microlm.io import write_json
from microlm.model import TransformerLM
from microlm.model.checkpoint import load_checkpoint
from microlm.tokenizer import Tokenizer
from microlm.train.curves import loss_fields, plot_curves, read_metrics
from microlm.train.dist import DistInfo, distributed
from microlm.train.trainer import Trainer

__all__ = ["sft_records", "task_records", "SFTEvaluator", "answers", "score_task", "baseline_scores", "run_sft"]


def sft_records(sd, root: Path | None) -> tuple[list, list, list[str]]:
    """``(train records, held-out records, input files)`` of the general conversations; held-out files
    are never trained on.  Without a data root: the embedded set, one conversation in five held out
    by a hash of its content.  The derived tasks are added by :func:`task_records`.  ``sd``: the
    ``sft.data`` settings; ``root``: the data bundle's folder (``None``: none)."""
    if root is None:
        train, held = [], []
        for r in embedded_sft_records():
            key = xxhash.xxh64_intdigest(str(r["conversations"]).encode())
            (held if key % 5 == 0 else train).append(r)
        return train, held, ["<embedded: data/sft/chat_zh.jsonl + data/sft/identity.jsonl>"]
    held_files = sorted({p for pat in sd.heldout for p in glob.glob(str(root / pat))})
    files = sorted({p for pat in sd.files for p in glob.glob(str(root / pat))} - set(held_files))
    if not files:
        raise MicroLMError(f"no SFT files match {sd.files} under {root}")
    train = [r for f in files for r in read_sft_file(f)]
    held = [r for f in held_files for r in read_sft_file(f)]
    if not held:  # no separate held-out file: hold out every 20th record
        held, train = train[::20], [r for k, r in enumerate(train) if k % 20]
    return train, held, files + held_files


def task_records(sd, seed: int) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """``({task: train examples}, {task: held-out examples})`` for ``sd.tasks`` (``sd``: ``sft.data``)."""
    return ({t: task_examples(t, "train", sd.task_records, seed) for t in sd.tasks},
            {t: task_examples(t, "heldout", sd.task_eval, seed) for t in sd.tasks})


def sample_weights(n_general: int, n_task: int, min_task_share: float) -> tuple[list[float] | None, float]:
    """Per-example sampling weights so that at least ``min_task_share`` of the sampled conversations
    are task ones (``None`` = uniform, when the natural share already reaches it); and that share."""
    total = n_general + n_task
    natural = n_task / total if total else 0.0
    if n_task == 0 or n_general == 0 or natural >= min_task_share:
        return None, natural
    return [(1 - min_task_share) / n_general] * n_general + [min_task_share / n_task] * n_task, min_task_share


def _interleave(*lists: list) -> list:
    out = []
    for k in range(max((len(x) for x in lists), default=0)):
        out += [x[k] for x in lists if k < len(x)]
    return out


def answers(model, tok, questions: list[str], max_new: int = 48, batch: int = 16) -> list[str]:
    """Greedy ChatML answers (no repetition penalty), cut at ``<|im_end|>``, in batches."""
    out: list[str] = []
    n = min(max_new, model.cfg.max_seq_len - 8)
    for i in range(0, len(questions), batch):
        gens = generate_text(model, tok, list(questions[i:i + batch]), chat=True, temperature=0,
                             repetition_penalty=1.0, max_new_tokens=n, context="truncate")
        out += [g.text for g in gens]
    return out


def score_task(model, tok, held: list[dict], max_new: int = 32) -> dict:
    """Entity scores of ``model``'s greedy answers on held-out task conversations + 5 examples."""
    said = answers(model, tok, [r["conversations"][0]["content"] for r in held], max_new=max_new)
    scores = entity_scores([parse_entities(a) for a in said], [r["gold"] for r in held])
    scores["examples"] = [{"text": r["text"], "gold": format_answer(r["gold"]), "answer": a}
                          for r, a in zip(held[:5], said[:5], strict=True)]
    return scores


def baseline_scores(train: list[dict], held: list[dict]) -> dict:
    golds = [r["gold"] for r in held]
    return {name: entity_scores(pred, golds) for name, pred in baseline_answers(train, held).items()}


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


def run_sft(sd, tc, mc, pre_dir: Path, tok_dir: Path, out_dir: Path, *, seed: int, data_root: Path | None,
            resume: bool = False, progress: bool = True, stop_after: int | None = None,
            dist: DistInfo | None = None) -> dict:
    """SFT of the pretrained model in ``pre_dir`` on ``sd`` (``sft.data``) with the loop ``tc`` into
    ``out_dir``; the report (held-out answers and task scores before and after)."""
    with distributed(tc.device, dist) as dist:
        tok = Tokenizer.load(tok_dir)
        train_recs, held_recs, files = sft_records(sd, data_root)
        if sd.max_records is not None:
            train_recs = train_recs[: sd.max_records]
        task_train, task_held = task_records(sd, seed)
        general_held = held_recs
        held_recs = _interleave(held_recs, *task_held.values())  # the loss is held out on both kinds
        general_ex, train_rep = encode_records(tok, train_recs, tc.seq_len)
        task_ex, task_rep = encode_records(tok, [r for t in sd.tasks for r in task_train[t]], tc.seq_len)
        train_rep = train_rep + task_rep
        train_ex = general_ex + task_ex
        if not train_ex:
            raise MicroLMError(f"no usable sft training conversations: {train_rep.to_dict()} "
                               f"(a longer sft.train.seq_len may help)")
        weights, task_share = sample_weights(len(general_ex), len(task_ex), sd.min_task_share)
        val_ex, val_rep = encode_records(tok, held_recs, tc.seq_len, max_kept=sd.val_records)
        if not val_ex:
            raise MicroLMError(f"no usable held-out SFT conversations: {val_rep.to_dict()} "
                               f"(a longer sft.train.seq_len may help)")
        torch.manual_seed(seed)
        model = TransformerLM(mc)
        load_checkpoint(pre_dir / "ckpt", model, expect={"model": mc.to_dict()}, restore_rng=False)
        questions = [r["conversations"][0]["content"] for r in general_held[: sd.show_answers]
                     if isinstance(r, dict) and r.get("conversations")]
        before = answers(model, tok, questions) if dist.is_main and not resume else None
        # the pretrained weights are loaded even on --resume, so the task scores "before" always exist
        tasks_before = {t: score_task(model, tok, task_held[t]) for t in sd.tasks} if dist.is_main else {}
        batches = SFTBatches(train_ex, tc.batch_size, tok.eos_id, seed, weights=weights)
        micro = tc.micro_batch_size or max(1, tc.batch_size // dist.world_size)
        evaluator = SFTEvaluator(SFTBatches(val_ex, micro, tok.eos_id, seed), tc.eval_batches, dist.device)
        trainer = Trainer(model, tc, out_dir, batches=batches, dist=dist, seed=seed,
                          run_meta={"model": mc.to_dict(), "stage": "sft"}, evaluate=evaluator, progress=progress,
                          flops_per_token=model.flops_per_token(tc.seq_len))
        base_eval = trainer.evaluate(trainer.raw_model) if dist.is_main and not resume else None
        t0 = time.time()
        result = trainer.fit(resume=resume, stop_after=stop_after)
        report: dict = {}
        if dist.is_main:
            after = answers(trainer.raw_model, tok, questions)
            tasks = {t: {"train_examples": len(task_train[t]), "before": tasks_before[t],
                         "after": score_task(trainer.raw_model, tok, task_held[t]),
                         "baselines": baseline_scores(task_train[t], task_held[t])} for t in sd.tasks}
            train, evals = read_metrics(out_dir)
            report = {
                "inputs": files, "train_data": train_rep.to_dict(), "val_data": val_rep.to_dict(),
                "mix": {"general": len(general_ex), "tasks": len(task_ex), "task_share": round(task_share, 4)},
                "steps": result["steps"], "seconds_this_run": round(time.time() - t0, 1),
                **loss_fields(train, evals, base_eval),
                "tasks": tasks,
                "answers": [{"question": q, "before": b, "after": a}
                            for q, b, a in zip(questions, before or [None] * len(questions), after, strict=True)],
                "padding": "padded to the longest conversation in each batch; loss on assistant tokens only",
            }
            write_json(out_dir / "report.json", report)
            plot_curves(out_dir, train, evals)
        return report


