"""Stage B3's data: rendered IE chat lines → token ids and labels, and length-grouped batches.

**Labels.** The tokenizer's own chat template renders each conversation (``apply_chat_template``), so
training sees exactly the text the model will be prompted with.  The prompt — system, user and the
assistant header ``<|im_start|>assistant\\n`` — is the template's rendering of the conversation
without the answer and with the generation prompt; it must be a prefix of the full rendering (else
the template is not a chat template we can train on: one-line error).  Its labels are ``-100``; the
answer **and its end token** ``<|im_end|>`` are trained (the model must learn to stop); whatever
the template puts after that end token (Qwen2.5's newline) is ``-100`` again.

**Batches.** Dynamic padding (right padding, to the longest row of each micro-batch) with length
grouping: each epoch is a seeded permutation cut into *mega-batches* of ``group × batch_size``
examples; each mega-batch is sorted by length and cut into global batches, whose order is shuffled
again (as ``transformers``' ``LengthGroupedSampler``, without its longest-first rule).  A global batch is
a pure function of ``(seed, step)``, so a resumed run sees the same batches.  Under DDP the global
batch is sorted by length and dealt round-robin — row ``j`` goes to the micro-batch ``j mod
(world × n_micro)``, rank ``k mod world``, micro ``k // world`` — so every rank gets rows of the same
lengths and the split does not depend on timing.

**Loss.** The loss of a step is the sum of the token losses of the whole global batch ÷ the number
of trained tokens in the global batch (not a mean of per-rank or per-micro-batch means, which would
weight short answers more on some ranks).  Each micro-batch carries ``scale = world × n_micro ÷
global trained tokens``; ``SummedTokenLoss`` returns ``summed loss × scale``, and the shared
``Trainer``'s ``÷ n_micro`` and DDP's gradient average (``÷ world``) leave exactly that quotient.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from microlm.errors import MicroLMError

__all__ = ["IGNORE", "EncodedChat", "ChatEncoder", "encode_chats", "LengthGroupedBatches", "SummedTokenLoss",
           "chunked_ce_sum", "show_labels"]

IGNORE = -100


@dataclass
class EncodedChat:
    ids: list[int]
    labels: list[int]

    @property
    def trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def _ids(out) -> list[int]:
    """``apply_chat_template(tokenize=True)`` returns a list in transformers 4 and a BatchEncoding in 5."""
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


class ChatEncoder:
    """Token ids and labels of ``[system, user, assistant]`` conversations under a tokenizer's own chat
    template (a ``transformers`` tokenizer: Qwen2.5's, or the MicroLM export's)."""

    def __init__(self, tokenizer, end_token: str = "<|im_end|>"):
        if not getattr(tokenizer, "chat_template", None):
            raise MicroLMError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')} has no chat template: "
                               f"cannot render the IE conversations")
        self.tok = tokenizer
        end = tokenizer.convert_tokens_to_ids(end_token)
        if end is None or end == tokenizer.unk_token_id:
            raise MicroLMError(f"the tokenizer has no {end_token} token: the answers' end token")
        self.end_id = int(end)
        self.end_token = end_token

    def encode(self, messages: list[dict]) -> EncodedChat:
        if not messages or messages[-1]["role"] != "assistant":
            raise MicroLMError("a training conversation must end with the assistant's answer")
        prompt = _ids(self.tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True))
        full = _ids(self.tok.apply_chat_template(messages, tokenize=True))
        if full[:len(prompt)] != prompt:
            raise MicroLMError("the chat template renders the prompt differently with and without the answer: "
                               "cannot tell which tokens are the answer")
        ends = [i for i in range(len(prompt), len(full)) if full[i] == self.end_id]
        if not ends:
            raise MicroLMError(f"the chat template does not close the answer with {self.end_token}")
        last = ends[-1]
        labels = [IGNORE] * len(prompt) + full[len(prompt):last + 1] + [IGNORE] * (len(full) - last - 1)
        return EncodedChat(full, labels)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The generation prompt of a conversation (the answer, if present, left out)."""
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return _ids(self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def encode_chats(encoder: ChatEncoder, lines: Iterable[dict], cutoff: int) -> tuple[list[EncodedChat], dict]:
    """Encode rendered chat lines (``{"messages": ...}``); longer than ``cutoff`` tokens → dropped and
    counted (a cut answer would teach the model to stop mid-JSON).  ``(examples, counts)``."""
    out, counts = [], {"in": 0, "kept": 0, "dropped_over_cutoff": 0, "trained_tokens": 0, "tokens": 0}
    for line in lines:
        counts["in"] += 1
        ex = encoder.encode(line["messages"])
        if len(ex.ids) > cutoff:
            counts["dropped_over_cutoff"] += 1
            continue
        out.append(ex)
        counts["kept"] += 1
        counts["tokens"] += len(ex.ids)
        counts["trained_tokens"] += ex.trained
    return out, counts


class LengthGroupedBatches:
    """The ``BatchSource`` of stage B3: ``get(step, micro, n_micro, rank, world)`` →
    ``(ids, labels, scale)`` — right-padded to the micro-batch's longest row (see the module doc)."""

    def __init__(self, examples: list[EncodedChat], batch_size: int, pad_id: int, seed: int, *,
                 group: int = 50, grouped: bool = True):
        if len(examples) < batch_size:
            raise MicroLMError(f"{len(examples)} training examples, fewer than one batch of {batch_size}")
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.group, self.grouped = max(1, group), grouped
        self.lengths = np.array([len(e.ids) for e in examples])
        self.steps_per_epoch = len(examples) // batch_size  # the remainder differs every epoch
        self._epoch: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's global batches, ``(steps_per_epoch, batch_size)`` example indices."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.examples))[: self.steps_per_epoch * self.batch_size]
        if self.grouped:
            mega = self.group * self.batch_size
            parts = [perm[i:i + mega] for i in range(0, len(perm), mega)]
            perm = np.concatenate([p[np.argsort(-self.lengths[p], kind="stable")] for p in parts])
        batches = perm.reshape(self.steps_per_epoch, self.batch_size)
        if self.grouped:
            batches = batches[rng.permutation(self.steps_per_epoch)]
        self._epoch = (epoch, batches)
        return batches

    def rows(self, step: int) -> np.ndarray:
        """The global batch of ``step``, longest first."""
        rows = self._order(step // self.steps_per_epoch)[step % self.steps_per_epoch]
        return rows[np.argsort(-self.lengths[rows], kind="stable")]

    def trained_tokens(self, rows) -> int:
        return sum(self.examples[int(r)].trained for r in rows)

    def collate(self, rows, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        exs = [self.examples[int(r)] for r in rows]
        width = max(len(e.ids) for e in exs)
        x = torch.full((len(exs), width), self.pad_id, dtype=torch.long)  # (B, T) ids, right-padded
        y = torch.full((len(exs), width), IGNORE, dtype=torch.long)  # (B, T) labels: pads never train
        for i, e in enumerate(exs):
            x[i, :len(e.ids)] = torch.tensor(e.ids)
            y[i, :len(e.labels)] = torch.tensor(e.labels)
        return x, y, torch.tensor(scale, dtype=torch.float32)

    def get(self, step: int, micro: int, n_micro: int, rank: int, world: int):
        rows = self.rows(step)
        share = world * n_micro
        if len(rows) % share:
            raise MicroLMError(f"batch_size {len(rows)} is not a multiple of {world} process(es) × {n_micro} "
                               f"micro-batches")
        count = self.trained_tokens(rows)
        # the sorted global batch dealt round-robin: this rank's micro-batch is every share-th row
        return self.collate(rows[micro * world + rank::share], share / max(1, count))


# causal LMs whose logits are exactly ``lm_head(decoder(ids).last_hidden_state)`` (no scaling or soft-capping)
_PLAIN_HEAD = ("llama", "qwen2", "qwen3", "mistral")


def _trunk(model: nn.Module):
    """``(ids → final hidden states, output head)`` of a causal LM whose logits are a plain linear
    head over them (MicroLM's ``TransformerLM``; Llama/Qwen2 in ``transformers``, PEFT-wrapped or not),
    else ``None``."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(m, "hidden") and isinstance(getattr(m, "lm_head", None), nn.Linear):
        return m.hidden, m.lm_head
    inner, head = getattr(m, "model", None), getattr(m, "lm_head", None)
    if inner is not None and isinstance(head, nn.Linear) and getattr(m.config, "model_type", None) in _PLAIN_HEAD:
        return (lambda ids: inner(input_ids=ids).last_hidden_state), head
    return None


def _ce_sum(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight, bias)  # (N, C) -> (N, V)
    return F.cross_entropy(logits.float(), y, reduction="sum")  # against y: (N,)


def chunked_ce_sum(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Σ cross-entropy of ``head(hidden)`` against ``labels`` over the rows whose label is not
    ``IGNORE`` — the logits of only those rows, ``rows`` at a time, each chunk recomputed in the
    backward pass instead of stored (``torch.utils.checkpoint``): memory of one chunk's logits, never
    the ``tokens × vocabulary`` fp32 tensor (3.7 GB for 8 × 400 tokens of Qwen2.5's 151,936)."""
    from torch.utils.checkpoint import checkpoint

    sel = labels != IGNORE  # (B, T-1) bool
    h, y = hidden[sel], labels[sel]  # (B, T-1, C) -> (N, C) and (N,), N = trained tokens
    rows = rows or max(1, 2**25 // head.out_features)  # 2^25 fp32 logits ≈ 128 MB per chunk
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, len(y), rows):
        args = (h[i:i + rows], head.weight, head.bias, y[i:i + rows])
        # checkpoint: keep only the chunk's inputs; its (rows, V) logits are recomputed in backward
        total = total + (checkpoint(_ce_sum, *args, use_reentrant=False) if torch.is_grad_enabled()
                         else _ce_sum(*args))
    return total


class SummedTokenLoss(nn.Module):
    """Wraps a causal LM for the shared ``Trainer``: ``forward(ids, labels, scale)`` →
    ``(None, summed next-token loss × scale)``.  Works for a ``transformers`` model (``.logits``) and a
    MicroLM ``TransformerLM`` (returns ``(logits, loss)``).  Right padding needs no attention mask:
    causal attention never lets a real token see the pads after it.

    Where the model's logits are a plain head over its final hidden states (``_trunk``), only the
    trained positions (the answers, about a third of the tokens) go through the head, in chunks
    (``chunked_ce_sum``) — the same sum (tested) for a fraction of the head's work and memory."""

    def __init__(self, model: nn.Module, *, chunked: bool = True, chunk_rows: int | None = None):
        super().__init__()
        self.model = model
        self._trunk = _trunk(model) if chunked else None
        self.chunk_rows = chunk_rows  # None: ~128 MB of fp32 logits per chunk

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids)
        return out[0] if isinstance(out, tuple) else out.logits

    def summed(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # position t predicts token t + 1: the last position has no target and the first token is no target
        if self._trunk is not None:
            hidden, head = self._trunk
            # (B, T, C) -> (B, T-1, C) hidden states against (B, T-1) labels
            return chunked_ce_sum(hidden(ids)[:, :-1], head, labels[:, 1:], self.chunk_rows)
        logits = self.logits(ids)[:, :-1]  # (B, T, V) -> (B, T-1, V)
        # (B·(T-1), V) against (B·(T-1),), in fp32
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE, reduction="sum")

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor):
        return None, self.summed(ids, labels) * scale


def show_labels(tokenizer, ex: EncodedChat, trained: str = "[{}]") -> str:
    """The conversation with each run of trained tokens wrapped in ``trained`` (for the notebook)."""
    out, k = [], 0
    while k < len(ex.ids):
        j = k
        on = ex.labels[k] != IGNORE
        while j < len(ex.ids) and (ex.labels[j] != IGNORE) == on:
            j += 1
        text = tokenizer.decode(ex.ids[k:j], skip_special_tokens=False)
        out.append(trained.format(text) if on else text)
        k = j
    return "".join(out)
