"""LoRA on a causal LM for relation extraction, two engines (what the ``ie_lora`` stage, B3, runs for
each of ``ie_lora.runs``).

The base is a ``transformers`` causal LM — a hub id (``Qwen/Qwen2.5-1.5B-Instruct`` at the ``gpu``
profile, through ``transformers``' own cache, ``HF_HUB_OFFLINE=1`` respected) or a local folder (the
``hf`` stage's MicroLM export at the ``cpu`` profile).  It trains on ``ie_data``'s rendered chat
lines (``06_train.jsonl``; the loss on the answer and its ``<|im_end|>`` only, see
``microlm/ie/lora_data.py``) with one of two engines:

- ``peft``: ``peft.get_peft_model`` on the ``transformers`` model — what practitioners run;
- ``microlm``: pipeline A's from-scratch LoRA (``microlm/model/lora.py``) on the same weights imported
  into ``TransformerLM`` (Llama-architecture bases only) — saved in PEFT's format, so the rest of
  pipeline B (merge, evaluation, serving) cannot tell the two apart.

Both run in the project's own ``Trainer`` (the loop of pipeline A: AdamW, warmup + cosine, clipping,
exact resume, ``torchrun``/DDP, metrics.jsonl), so the engines see the same batches and the same loss
normalisation, and a killed run resumes from its last checkpoint — which holds only the trainable
weights (the adapters), not a copy of the base.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch

from microlm.errors import MicroLMError
from microlm.hw import peak_rss_mb, reset_peak_rss, resolve_precision
from microlm.ie.lora_data import ChatEncoder, LengthGroupedBatches, SummedTokenLoss, encode_chats
from microlm.ie.mix import answer_triples, balanced_sample, contaminated, describe_mix, line_input
from microlm.io import (
    iter_json_lines,
    load_json_file,
    read_json,
    read_jsonl,
    staged_dir,
    staged_writes,
    write_json,
)
from microlm.model.hf_export import import_hf
from microlm.model.lora import LLAMA_PROJ, LoRAConfig, adapter_state_dict, apply_lora, save_adapter
from microlm.tokenizer.tokenizer import render_chat
from microlm.train.curves import loss_fields, plot_curves, read_metrics
from microlm.train.dist import distributed
from microlm.train.settings import TrainConfig
from microlm.train.trainer import Trainer

__all__ = ["ALL_LINEAR", "lora_share", "peft_targets_to_logical", "check_base_folder", "load_tokenizer",
           "check_vocabulary", "embedding_rows", "naming_writes", "load_base", "attach_peft", "attach_microlm",
           "copy_microlm_init_to_peft", "template_mismatch"]

# Qwen2.5 / Llama projection names: every linear layer of the blocks; never lm_head or embeddings
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Qwen2.5-1.5B-Instruct's published config.json (the fields that shape the model), for counting its
# parameters without downloading it
QWEN25_15B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                  num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6)


def lora_share(model_config, r: int, targets, dtype=torch.float32) -> dict:
    """Trainable parameters of LoRA ``r`` on ``targets`` for an architecture given by its
    ``transformers`` config (a ``PretrainedConfig`` or a dict with ``model_type``) — built on the meta
    device, so no weights are read or allocated (Qwen2.5-1.5B at r=8 all-linear: 0.59 %)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(model_config, dict):
        d = dict(model_config)
        model_config = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
        per_type: dict[str, int] = {}
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                      task_type="CAUSAL_LM"))
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            kind = name.split(".lora_")[0].rsplit(".", 1)[-1]
            per_type[kind] = per_type.get(kind, 0) + p.numel()
    trainable, total = peft_model.get_nb_trainable_parameters()
    return {"trainable": trainable, "total": total, "base": total - trainable,
            "percent": round(100 * trainable / total, 4), "per_module": dict(sorted(per_type.items()))}


def peft_targets_to_logical(targets) -> list[str]:
    """PEFT/Llama module names → the logical names of ``microlm.model.lora`` (``q_proj`` → ``q``)."""
    inv = {v.rsplit(".", 1)[-1]: k for k, v in LLAMA_PROJ.items()}
    bad = [t for t in targets if t not in inv]
    if bad:
        raise MicroLMError(f"the microlm engine adapts {', '.join(inv)}; not {', '.join(bad)}")
    return [inv[t] for t in targets]


def check_base_folder(folder: Path) -> None:
    """A local base model folder must hold a config, weights and a tokenizer with a chat template."""
    if not folder.is_dir():
        raise MicroLMError(f"base model folder {folder} does not exist")
    missing = [n for n in ("config.json",) if not (folder / n).is_file()]
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        missing.append("model weights (*.safetensors)")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        missing.append("tokenizer.json")
    if missing:
        raise MicroLMError(f"base model folder {folder} is missing {', '.join(missing)}")


def resolve_base(base: str) -> str:
    p = Path(base)
    if p.exists() or base.startswith((".", "/", "~")) or base.count("/") != 1:
        check_base_folder(p.expanduser())
        return str(p.expanduser())
    return base  # a hub id: transformers' cache rules (HF_HUB_OFFLINE=1 → the cache only)


def _hub_error(base: str, e: Exception) -> MicroLMError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    why = ("it is not in the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline
           else f"the hub cannot be reached or has no such model ({str(e).splitlines()[0][:160]})")
    return MicroLMError(f"cannot load base model {base!r}: {why} — run where the hub is reachable (transformers "
                        f"caches it), or give a local folder: MICROLM_QWEN=/path/to/the/model for the profile's "
                        f"Qwen, or the folder itself in the config")


def load_tokenizer(base: str, *, weights: bool = True):
    """The base's tokenizer (right padding, a pad token); ``weights=False``: a folder that holds only a
    tokenizer (an adapter folder)."""
    from transformers import AutoTokenizer

    src = resolve_base(base) if weights else base
    folder = Path(src).expanduser()
    local = folder.is_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # not JSON: one line saying where it breaks
        if local and (folder / name).is_file():
            load_json_file(folder / name, "tokenizer file")
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as e:  # the tokenizers library raises a bare Exception on a damaged file
        if not local:
            if isinstance(e, (OSError, ValueError)):
                raise _hub_error(base, e) from None
            raise
        where = next((folder / n for n in ("tokenizer.json", "tokenizer.model") if (folder / n).is_file()), folder)
        why = (str(e).splitlines() or [""])[0][:200] or type(e).__name__
        raise MicroLMError(f"cannot load the tokenizer of {base} from {where}: {why} — the file is damaged or not a "
                           f"Hugging Face tokenizer; copy it again from the model's source") from None
    if not getattr(tok, "chat_template", None):
        raise MicroLMError(f"the tokenizer of {base} has no chat template: cannot render the IE conversations")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def template_mismatch(tok, messages: list[dict]) -> str | None:
    """``None`` when ``tok``'s chat template renders ``messages`` as ChatML the way ``ie_data`` rendered
    them (``microlm.tokenizer.render_chat``); else where the two texts first differ."""
    want = render_chat(messages)
    got = tok.apply_chat_template(messages, tokenize=False)
    if got == want:
        return None
    i = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    return f"at character {i}: template gives {got[max(0, i - 20):i + 30]!r}, the data {want[max(0, i - 20):i + 30]!r}"


def embedding_rows(model) -> int | None:
    """The rows of a model's input embeddings (``transformers``/PEFT or ``TransformerLM``)."""
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings().num_embeddings
    emb = getattr(model, "embed", None)
    return emb.num_embeddings if isinstance(emb, torch.nn.Embedding) else None


def check_vocabulary(tok, model, base: str) -> None:
    """Every id the tokenizer can give — its vocabulary, added tokens, the chat template's specials and
    the pad id — must have an embedding row, else training stops in the embedding with an IndexError."""
    rows = embedding_rows(model)
    if rows is None:
        return
    ids = [len(tok) - 1, *tok.get_vocab().values(), *tok.all_special_ids, tok.pad_token_id,
           *(tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))]
    top = max(i for i in ids if isinstance(i, int))
    if top >= rows:
        raise MicroLMError(f"the tokenizer of {base} gives ids up to {top:,} but its model has only {rows:,} "
                           f"embeddings: tokenizer and weights do not belong together — put the tokenizer the "
                           f"model was trained with beside its weights (or a base whose config.json vocab_size "
                           f"covers the tokenizer)")


def load_base(base: str, dtype: torch.dtype = torch.float32):
    """The ``transformers`` causal LM of ``base`` (un-quantized; a quantized base is refused)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = resolve_base(base)
    try:
        conf = AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise _hub_error(base, e) from None
    if getattr(conf, "quantization_config", None):
        method = getattr(conf.quantization_config, "quant_method", None) or dict(conf.quantization_config).get(
            "quant_method", "?")
        raise MicroLMError(f"base model {base} is quantized ({method}): the IE LoRA and the merge need the "
                           f"un-quantized weights (merging into quantized weights loses the adapter's precision)")
    try:
        return AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    except (OSError, ValueError) as e:
        raise _hub_error(base, e) from None


def attach_peft(model, r: int, alpha: float, dropout: float, targets):
    """``get_peft_model`` with LoRA on ``targets`` (a target that matches no module is an error)."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise MicroLMError(f"LoRA target(s) {', '.join(unknown)} match no linear layer of the base model "
                           f"(its linear layers: {', '.join(sorted(names))})")
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                            target_modules=list(targets), bias="none", task_type="CAUSAL_LM"))


def attach_microlm(folder: str | Path, r: int, alpha: float, dropout: float, targets):
    """The Llama-architecture base imported into ``TransformerLM`` with pipeline A's LoRA on ``targets``
    (PEFT names); ``(model, LoRAConfig, report)``."""
    model, _ = import_hf(folder)
    lcfg = LoRAConfig(r=r, alpha=alpha, dropout=dropout, targets=peft_targets_to_logical(targets))
    report = apply_lora(model, lcfg)
    return model.train(), lcfg, report


def copy_microlm_init_to_peft(microlm_model, peft_model) -> int:
    """Give the PEFT model the from-scratch engine's initial ``A``/``B`` matrices (so the two engines
    can be compared step by step); the number of tensors copied."""
    from peft import set_peft_model_state_dict

    sd = adapter_state_dict(microlm_model)
    result = set_peft_model_state_dict(peft_model, sd)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise MicroLMError(f"adapter tensors that fit no PEFT module: {unexpected[:3]}")
    return len(sd)


class ValLoss:
    """Answer-token loss (summed ÷ trained tokens) on fixed held-out examples, longest first."""

    def __init__(self, examples, batch_size: int, pad_id: int, device: str, amp=None):
        self.examples = sorted(examples, key=lambda e: -len(e.ids))
        self.src = LengthGroupedBatches(self.examples, 1, pad_id, 0)  # collate only
        self.bs, self.device, self.amp = batch_size, device, amp

    @torch.no_grad()
    def __call__(self, wrapped) -> dict:
        was = wrapped.training
        wrapped.eval()
        total, count = 0.0, 0
        for i in range(0, len(self.examples), self.bs):
            x, y, _ = self.src.collate(range(i, min(len(self.examples), i + self.bs)), 1.0)
            with self.amp or contextlib.nullcontext():
                total += float(wrapped.summed(x.to(self.device), y.to(self.device)))
            count += int((y[:, 1:] != -100).sum())
        wrapped.train(was)
        val = total / max(count, 1)
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0)), "val_tokens": count}


def lockstep_losses(model, examples, pad_id: int, steps: int, out_dir: Path, *, batch_size: int = 4,
                    lr: float = 3e-2, min_lr: float | None = None, seed: int = 7, group: int = 2,
                    precision: str = "fp32") -> list[float]:
    """The loss of each of ``steps`` optimizer steps of ``model`` (adapters trainable) on the same
    length-grouped batches of ``examples`` every time it is called with the same ``seed``: what the
    two-engines check runs once per engine (cosine from ``lr`` to ``min_lr`` = lr/10, no warmup, fp32
    unless asked)."""
    tc = TrainConfig(batch_size=batch_size, max_steps=steps, lr=lr, min_lr=lr / 10 if min_lr is None else min_lr, warmup_steps=0, weight_decay=0.0,
                     eval_interval=10**9, ckpt_interval=10**9, log_interval=1, precision=precision, grad_clip=1.0,
                     sample_tokens=0, device="cpu")
    losses: list[float] = []
    trainer = Trainer(SummedTokenLoss(model), tc, out_dir,
                      batches=LengthGroupedBatches(examples, batch_size, pad_id, seed, group=group),
                      progress=False, on_step=lambda s, rec: losses.append(rec["loss"]), trainable_only=True)
    trainer.fit()
    return losses


def build_engine(engine: str, base: str, lc, *, dtype: torch.dtype = torch.float32):
    """``(causal LM with adapters, what to save it with)`` for ``engine`` = ``peft`` | ``microlm``.
    ``dtype``: the frozen base's weights (bf16 halves the memory where bf16 is native; PEFT keeps the
    adapters themselves in fp32)."""
    if engine == "peft":
        model = load_base(base, dtype)
        if lc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        return attach_peft(model, lc.r, lc.alpha, lc.dropout, lc.targets), None
    if engine == "microlm":
        folder = Path(resolve_base(base))
        if not folder.is_dir():
            raise MicroLMError(f"the microlm engine needs a local Llama-architecture folder, not {base!r}")
        model, lcfg, _ = attach_microlm(folder, lc.r, lc.alpha, lc.dropout, lc.targets)
        return model, lcfg
    raise MicroLMError(f"unknown ie_lora engine {engine!r} (peft | microlm)")


def trainable_report(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "percent": round(100 * trainable / total, 4)}


def read_lines(path: Path, limit: int | None = None) -> list[dict]:
    """An ie_data file's rows (the first ``limit``)."""
    return list(read_jsonl(path, limit, hint="run the ie_data stage first (`microlm ie-data`)"))


def training_mix(lc, data_dir: Path, seed: int) -> tuple[list[dict], dict]:
    """``ie_lora``'s training conversations (``microlm/ie/mix.py``): ``train_examples`` of
    ``06_train.jsonl``, none whose text is (near) one of the test split's, balanced by topic, with
    ``empty_share`` all-empty answers; and what the mix holds (for the report and the notebook).  The
    file is read twice — topics, empty answers and texts first, then only the drawn lines — so a large
    training split is never held in memory as conversations."""
    path = data_dir / "06_train.jsonl"
    if not path.is_file():
        raise MicroLMError(f"missing {path}: run the ie_data stage first (`microlm ie-data`)")
    topics, empty, texts = [], [], []
    for _, _, line in iter_json_lines(path):
        topics.append(line["cate"])
        empty.append(not answer_triples(line["messages"][-1]["content"]))
        texts.append(line_input(line))
    if not topics:
        raise MicroLMError(f"{path} holds no training conversation: the IE data is empty "
                           f"(see ie_data's 01_standardize_stats.json)")
    excluded, eval_texts = None, []
    test = data_dir / "06_test.jsonl"  # the evaluation prompts are drawn from it; every test text counts
    if lc.decontaminate is not None and test.is_file():
        eval_texts = [line_input(x) for _, _, x in iter_json_lines(test)]
        excluded = contaminated(texts, eval_texts, threshold=lc.decontaminate, seed=seed)
    del texts
    picked, report = balanced_sample(topics, empty, lc.train_examples, empty_share=lc.empty_share, seed=seed,
                                     excluded=excluded)
    if not picked:
        raise MicroLMError(f"{path}: none is left to train on — all {report['excluded']:,} of its conversations are "
                           f"(near) duplicates of test texts ({test}); lower ie_lora.decontaminate "
                           f"({lc.decontaminate}; null = no check) or rebuild ie_data")
    order = {i: k for k, i in enumerate(picked)}
    sample: list = [None] * len(picked)
    for n, (_, _, line) in enumerate(iter_json_lines(path)):
        if n in order:
            sample[order[n]] = line
    prompts = data_dir / "06_eval_prompts.jsonl"
    golds = [(p["gold"], p["cate"]) for p in read_lines(prompts) if p.get("gold")] if prompts.is_file() else []
    return sample, {**report, "decontaminate_threshold": lc.decontaminate, "eval_texts": len(set(eval_texts)),
                    **describe_mix(sample, golds)}


def base_dtype(tc) -> torch.dtype:
    """The dtype the frozen base is loaded in: bf16 where training runs in bf16 (native bf16 CPUs, GPUs)."""
    return torch.bfloat16 if resolve_precision(tc.precision, tc.device) == "bf16" else torch.float32


def train_ie_lora(lc, run: dict, base: str, data_dir: Path, out_dir: Path, *, seed: int, data_cutoff: int | None = None,
                  resume: bool = False,
                  progress: bool = True, stop_after: int | None = None, dist=None, init_from=None,
                  run_fingerprint: str | None = None) -> dict:
    """Train one ``ie_lora`` run (``{"name", "base", "engine"}``) with the settings ``lc`` (the run's
    ``ie_lora`` section; ``data_cutoff``: ie_data's token cutoff) on ``data_dir``'s rendered lines into
    ``out_dir`` (``adapter/`` in PEFT format + tokenizer files, ``metrics.jsonl``, ``curves.png``,
    ``report.json``).  ``init_from``: a from-scratch LoRA model whose initial A/B the PEFT engine copies;
    ``run_fingerprint``: recorded in the checkpoints and the report (what makes this sub-run itself)."""
    tc = lc.train
    reset_peak_rss()  # this run's peak, not an earlier run's of the same process
    with distributed(tc.device, dist) as dist:
        tok = load_tokenizer(base)
        train_lines, mix = training_mix(lc, data_dir, seed)
        val_lines = read_lines(data_dir / "06_val.jsonl", lc.val_examples or None)
        if not val_lines:
            raise MicroLMError(f"{data_dir / '06_val.jsonl'} holds no conversation: nothing to validate on")
        why = template_mismatch(tok, train_lines[0]["messages"])
        if why:
            raise MicroLMError(f"the chat template of {base} differs from the one ie_data rendered with ({why})")
        enc = ChatEncoder(tok)
        torch.manual_seed(seed)
        dtype = base_dtype(lc.train) if run["engine"] == "peft" else torch.float32
        model, lcfg = build_engine(run["engine"], base, lc, dtype=dtype)
        check_vocabulary(tok, model, base)
        limit = getattr(getattr(model, "cfg", None), "max_seq_len", None) or getattr(
            model.config, "max_position_embeddings", None)
        cutoff = min(x for x in (lc.cutoff_tokens, limit, data_cutoff) if x)
        train_ex, counts = encode_chats(enc, train_lines, cutoff)
        val_ex, val_counts = encode_chats(enc, val_lines, cutoff)
        counts["sampled_from"] = mix["available"]
        if len(train_ex) < tc.batch_size:
            raise MicroLMError(f"{len(train_ex)} of {len(train_lines)} training examples fit the cutoff of {cutoff} "
                               f"tokens (the base's context is {limit}), fewer than one batch of {tc.batch_size}")
        if init_from is not None:
            copy_microlm_init_to_peft(init_from, model)
        wrapped = SummedTokenLoss(model)
        batches = LengthGroupedBatches(train_ex, tc.batch_size, tok.pad_token_id, seed, group=lc.group)
        mean_len = sum(len(e.ids) for e in train_ex) / len(train_ex)
        micro = tc.micro_batch_size or max(1, tc.batch_size // dist.world_size)
        trainer = Trainer(wrapped, tc, out_dir, batches=batches, dist=dist, seed=seed, progress=progress,
                          tokens_per_step=round(tc.batch_size * mean_len), trainable_only=True,
                          run_meta={"stage": "ie_lora", "run": run, "base": base,
                                    "lora": {k: getattr(lc, k) for k in ("r", "alpha", "dropout", "targets")},
                                    "model": {"cutoff": cutoff}, "run_fingerprint": run_fingerprint})
        trainer.evaluate = ValLoss(val_ex, micro, tok.pad_token_id, dist.device, trainer.amp)
        base_eval = None
        if dist.is_main:  # the base model's held-out loss, once per run (a resumed run reads it back)
            saved = out_dir / "base_eval.json"
            base_eval = read_json(saved) if resume and saved.is_file() else None
            if base_eval is None:
                base_eval = trainer.evaluate(trainer.raw_model)
                write_json(saved, base_eval)
        t0 = time.time()
        with naming_writes(trainer.metrics_path):  # the loop's own unnamed writes are its metrics lines
            result = trainer.fit(resume=resume, stop_after=stop_after)
        seconds = time.time() - t0
        report: dict = {}
        if dist.is_main:
            from transformers import AutoConfig

            base_config = AutoConfig.from_pretrained(resolve_base(base)).to_dict()
            adapter = out_dir / "adapter"
            # staged: a failed write (a full disk) leaves the old adapter or none, never half of one; the
            # folder is shared at the end (PEFT writes its weights 0600: other stages and users read them)
            with staged_dir(adapter) as tmp, staged_writes(tmp, adapter, "writing the adapter",
                                                           weights="adapter_model.safetensors"):
                if lcfg is None:
                    model.save_pretrained(tmp)
                else:
                    save_adapter(model, lcfg, tmp, base_model_name=str(base))
                tok.save_pretrained(tmp)
                # the merge stage refuses another base with the differing fields listed
                write_json(tmp / "base_config.json", base_config)
            real = sum(len(e.ids) for s in range(result["steps"]) for e in
                       (batches.examples[int(r)] for r in batches.rows(s)))
            train, evals = read_metrics(out_dir)
            report = {"run": run, "base": base, "engine": run["engine"], "params": trainable_report(model),
                      "base_dtype": str(dtype).replace("torch.", ""), "cutoff": cutoff, "train_data": counts,
                      "val_data": val_counts, "mix": mix,
                      "trained_token_share": round(counts["trained_tokens"] / max(1, counts["tokens"]), 4),
                      "steps": result["steps"], "max_steps": tc.max_steps, "seconds_this_run": round(seconds, 1),
                      "precision": trainer.precision, "run_fingerprint": run_fingerprint,
                      "useful_tokens_per_s": round(real / max(seconds, 1e-9), 1) if not resume else None,
                      "peak_rss_mb": peak_rss_mb(), **loss_fields(train, evals, base_eval)}
            curves = out_dir / "curves.png"
            try:
                with naming_writes(curves):
                    plot_curves(out_dir, train, evals)
            except BaseException:
                curves.unlink(missing_ok=True)  # never a cut image
                raise
            write_json(out_dir / "report.json", report)  # last: a run with its report is a finished run
        return report


@contextlib.contextmanager
def naming_writes(path: Path):
    """An ``OSError`` of the block that names no file (a write to an open file on a full disk or past
    the size limit) names ``path``, so the CLI's one line says where."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
