"""Precision: ``auto`` resolved from the hardware, bf16 autocast training that tracks fp32, bf16 inference."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from microlm import hw
from microlm.errors import MicroLMError
from microlm.model import ModelConfig, TransformerLM, load_model
from microlm.model.checkpoint import save_checkpoint
from microlm.stages import load_config
from microlm.train.settings import TrainConfig, trajectory_config
from microlm.train.trainer import Trainer

TINY = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_seq_len=32)


class MarkovBatches:
    """Sequences from a fixed random Markov chain (each token has 3 likely successors): a loss that
    falls well below ln(64) within a few dozen steps, the same batches for every run."""

    def __init__(self, seq_len: int = 32, batch: int = 8):
        g = torch.Generator().manual_seed(7)
        self.next = torch.randint(0, TINY.vocab_size, (TINY.vocab_size, 3), generator=g)
        self.seq_len, self.batch = seq_len, batch

    def get(self, step, micro, n_micro, rank, world):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.empty(self.batch, self.seq_len + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, TINY.vocab_size, (self.batch,), generator=g)
        choice = torch.randint(0, 3, (self.batch, self.seq_len), generator=g)
        for t in range(self.seq_len):
            x[:, t + 1] = self.next[x[:, t], choice[:, t]]
        return x[:, :-1], x[:, 1:]


def _curve(tmp_path, precision: str, steps: int = 40) -> tuple[list[float], TransformerLM, Trainer]:
    torch.manual_seed(0)
    model = TransformerLM(TINY)
    tc = TrainConfig(batch_size=8, seq_len=32, max_steps=steps, lr=3e-3, min_lr=3e-4, warmup_steps=4,
                     log_interval=1, eval_interval=10 ** 6, ckpt_interval=10 ** 6, precision=precision, device="cpu")
    trainer = Trainer(model, tc, tmp_path / precision, batches=MarkovBatches(), seed=0, progress=False)
    trainer.fit()
    rows = [json.loads(r) for r in (tmp_path / precision / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"], model, trainer


def test_bf16_autocast_tracks_the_fp32_curve(tmp_path):
    """Same seed and batches: bf16 autocast (fp32 master weights and AdamW state) stays within
    0.05 nats of the fp32 curve at every step and within 0.02 on average over the last quarter,
    while both learn (the loss falls by more than 1 nat).  Measured on an AVX2 CPU (bf16 fallback):
    max 0.0005 over 40 steps; native bf16 kernels accumulate differently, hence the margin."""
    fp32, _, _ = _curve(tmp_path, "fp32")
    seen = []
    bf16, model, trainer = _curve(tmp_path, "bf16")
    assert trainer.precision == "bf16"
    # master weights and optimizer state stayed fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for s in trainer.optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.is_floating_point())
    # and the products really ran in bf16 under the trainer's autocast
    h = model.layers[0].mlp.gate_up_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with trainer.amp:
        model(torch.zeros(1, 4, dtype=torch.long))
    h.remove()
    assert seen == [torch.bfloat16]
    assert fp32[0] - fp32[-1] > 1.0 and bf16[0] - bf16[-1] > 1.0
    diffs = [abs(a - b) for a, b in zip(fp32, bf16, strict=True)]
    assert max(diffs) < 0.05, max(diffs)
    tail = diffs[-len(diffs) // 4:]
    assert sum(tail) / len(tail) < 0.02
    assert fp32 != bf16  # it really was another computation


def _fresh_probe(monkeypatch, tmp_path, native: bool, steps: dict | list[dict] | None):
    """``precision_probe`` on a pretend CPU: ``native`` bf16 or not; ``steps`` the probe's step seconds
    (a list: one per try, with ``waited``, the share of the time its threads waited for a CPU; ``None``:
    measuring fails the test)."""
    monkeypatch.setenv("MICROLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hw, "cpu_bf16", lambda: (native, "flags avx512_bf16" if native else "no avx512_bf16"))
    tries = [{"waited": 0.0, **steps}] if isinstance(steps, dict) else list(steps or [])

    def measure():
        assert tries, "the probe measured where it should not (or more often than it should)"
        return tries.pop(0)
    monkeypatch.setattr(hw, "_probe_steps", measure)
    hw.precision_probe.cache_clear()


def test_auto_resolves_by_measurement(monkeypatch, tmp_path):
    try:
        _fresh_probe(monkeypatch, tmp_path, True, {"fp32": 0.100, "bf16": 0.060})
        assert hw.resolve_precision("auto", "cpu") == "bf16"
        probe = hw.precision_probe()
        assert probe["measured"] and probe["bf16_speedup"] == pytest.approx(1.667, abs=1e-3)
        assert probe["fp32_step_ms"] == 100.0 and "busy" in probe and "×1.67" in probe["why"]
        cfg = load_config("cpu")
        bf16_machine = trajectory_config(cfg.pretrain)["precision"]
        # cached per machine: the next process reads the file, measures nothing
        _fresh_probe(monkeypatch, tmp_path, True, None)
        assert hw.precision_probe()["choice"] == "bf16" and "cached" in hw.precision_probe()
        # native bf16 flags, but the probe finds bf16 no faster: fp32
        _fresh_probe(monkeypatch, tmp_path / "other", True, {"fp32": 0.100, "bf16": 0.098})
        assert hw.resolve_precision("auto", "cpu") == "fp32"
        assert "< 1.1" in hw.precision_probe()["why"]
        # no native bf16: nothing measured (bf16 is a fallback ~80× slower), fp32
        _fresh_probe(monkeypatch, tmp_path / "none", False, None)
        assert hw.resolve_precision("auto", "cpu") == "fp32" and not hw.precision_probe()["measured"]
        assert not list((tmp_path / "none").glob("**/*.json"))
        assert hw.resolve_precision("bf16", "cpu") == "bf16"  # explicit: runs (warns where emulated)
        assert hw.resolve_precision("fp32", "cpu") == "fp32"
        # the cpu profile says auto: the same config is another run on a machine where bf16 pays
        assert bf16_machine == "bf16" and trajectory_config(cfg.pretrain)["precision"] == "fp32"
        with pytest.raises(ValueError, match="precision must be one of"):
            hw.resolve_precision("fp16", "cpu")
    finally:
        hw.precision_probe.cache_clear()


def test_a_cache_of_another_machine_is_measured_again(monkeypatch, tmp_path):
    try:
        _fresh_probe(monkeypatch, tmp_path, True, {"fp32": 0.1, "bf16": 0.05})
        first = hw.precision_probe()
        (path,) = (tmp_path / "cache").glob("precision-probe-*.json")
        rec = json.loads(path.read_text())
        rec["key"]["torch"] = "0.0"  # a file whose key is not this machine's (copied, or an old torch)
        rec["choice"] = "fp32"
        path.write_text(json.dumps(rec))
        _fresh_probe(monkeypatch, tmp_path, True, {"fp32": 0.1, "bf16": 0.05})
        assert hw.precision_probe()["choice"] == "bf16" == first["choice"]
        path.write_text("{cut")  # a cut file: measured again, not a traceback
        _fresh_probe(monkeypatch, tmp_path, True, {"fp32": 0.1, "bf16": 0.05})
        assert hw.precision_probe()["choice"] == "bf16"
    finally:
        hw.precision_probe.cache_clear()


def test_a_contended_probe_is_measured_again_and_never_kept_for_good(monkeypatch, tmp_path):
    """A neighbour on the cores made bf16 look no faster once (×0.96 where a quiet probe measures ×1.6):
    such a probe is retried, and one contended on every try is cached for an hour only."""
    busy, quiet = {"fp32": 1.30, "bf16": 1.35, "waited": 0.5}, {"fp32": 0.10, "bf16": 0.06, "waited": 0.01}
    monkeypatch.setattr(hw.time, "sleep", lambda s: None)
    try:
        _fresh_probe(monkeypatch, tmp_path, True, [busy, quiet])  # the second try finds the cores free
        probe = hw.precision_probe()
        assert probe["choice"] == "bf16" and probe["tries"] == 2 and not probe["contended"]
        _fresh_probe(monkeypatch, tmp_path / "busy", True, [busy] * hw.PROBE_TRIES)
        probe = hw.precision_probe()
        assert probe["choice"] == "fp32" and probe["contended"] and probe["tries"] == hw.PROBE_TRIES
        assert "contended" in probe["why"] and probe["waited_share"] == 0.5
        _fresh_probe(monkeypatch, tmp_path / "busy", True, None)  # within the hour: every process agrees
        assert hw.precision_probe()["choice"] == "fp32"
        (path,) = (tmp_path / "busy" / "cache").glob("precision-probe-*.json")
        rec = json.loads(path.read_text())
        rec["at_s"] -= hw.PROBE_CONTENDED_TTL_S + 1
        path.write_text(json.dumps(rec))
        _fresh_probe(monkeypatch, tmp_path / "busy", True, [quiet])  # an hour later: measured again
        assert hw.precision_probe()["choice"] == "bf16"
    finally:
        hw.precision_probe.cache_clear()


def test_the_real_probe_measures_both_precisions(monkeypatch, tmp_path):
    """The probe itself, once, on this machine (a few seconds): two positive step times, a choice that
    follows them, the cache file written."""
    monkeypatch.setenv("MICROLM_CACHE", str(tmp_path))
    hw.precision_probe.cache_clear()
    threads = torch.get_num_threads()
    try:
        probe = hw.precision_probe()
        if hw.cpu_bf16()[0]:  # (without native bf16 nothing is timed: the fallback is ~80× slower)
            assert probe["measured"] and list(tmp_path.glob("precision-probe-*.json"))
            assert 0 < probe["fp32_step_ms"] < 60_000 and 0 < probe["bf16_step_ms"] < 60_000
            assert probe["choice"] == ("bf16" if probe["bf16_speedup"] >= hw.BF16_MIN_SPEEDUP else "fp32")
            assert probe["threads"] == probe["cores_in_use"]  # measured on every core this process may use
            assert probe["tries"] >= 1 and 0 <= probe["waited_share"] < 1.5  # Linux reports run-queue waits
        else:
            assert probe["choice"] == "fp32" and not probe["measured"]
        assert torch.get_num_threads() == threads  # restored
    finally:
        hw.precision_probe.cache_clear()


def test_compile_auto_compiles_long_runs_where_it_can(monkeypatch):
    monkeypatch.setattr(hw.shutil, "which", lambda c: "/usr/bin/" + c)
    assert hw.resolve_compile("auto", "cpu", 4_096_000)[0]  # the cpu profile's pretraining
    on, why = hw.resolve_compile("auto", "cpu", 30 * 512)  # smoke: compiling would not pay
    assert not on and "would not pay" in why
    assert not hw.resolve_compile(False, "cpu", 10 ** 9)[0]
    assert hw.resolve_compile(True, "cpu", 10)[0]
    monkeypatch.setattr(hw.sysconfig, "get_paths", lambda: {"include": "/nonexistent"})  # g++ but no python3-dev
    assert hw.resolve_compile("auto", "cpu", 10 ** 9) == (False, "no Python.h (python3-dev) for torch.compile's "
                                                                  "CPU backend")
    monkeypatch.setattr(hw.shutil, "which", lambda c: None)
    assert hw.resolve_compile("auto", "cpu", 10 ** 9) == (False, "no C++ compiler for torch.compile's CPU backend")
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert not hw.resolve_compile(True, "cpu", 10 ** 9)[0]
    with pytest.raises(ValueError, match="compile must be"):
        hw.resolve_compile("yes", "cpu", 1)
    with pytest.raises(MicroLMError, match="compile must be true, false or auto"):
        load_config("cpu", {"pretrain.compile": "yes"})


def test_cpu_bf16_reads_the_flags(monkeypatch):
    hw.cpu_bf16.cache_clear()
    monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    try:
        ok, why = hw.cpu_bf16()
        assert not ok and "avx512_bf16" in why
    finally:
        hw.cpu_bf16.cache_clear()


def test_config_refuses_an_unknown_precision():
    with pytest.raises(MicroLMError, match="precision must be auto, fp32 or bf16"):
        load_config("cpu", {"pretrain.precision": "fp16"})


def test_bf16_inference_weights(tmp_path, chat_tok):
    torch.manual_seed(0)
    model = TransformerLM(replace(TINY, vocab_size=chat_tok.vocab_size))
    save_checkpoint(tmp_path / "ckpt", model, None, {"step": 0, "model": model.cfg.to_dict()})
    tok_dir = tmp_path / "tokenizer"
    chat_tok.save(tok_dir)
    m32, _ = load_model(tmp_path, tokenizer=tok_dir)
    m16, _ = load_model(tmp_path, tokenizer=tok_dir, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    assert m16.rope_cos.dtype == torch.float32  # positions keep fp32 tables
    assert m16.new_cache(1).k[0].dtype == torch.bfloat16
    x = torch.randint(3, chat_tok.vocab_size, (2, 16))
    with torch.no_grad():
        a, b = m32(x)[0], m16(x)[0].float()
    assert (a - b).abs().max() < 0.05 * a.abs().max() + 0.02
    with pytest.raises(MicroLMError, match="dtype must be one of"):
        load_model(tmp_path, tokenizer=tok_dir, dtype="fp16")


def test_chat_cli_takes_a_dtype(tmp_path):
    r = subprocess.run([sys.executable, "-c", "from microlm.cli import main; main()", "chat", "--dtype", "fp16"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'fp16'" in r.stderr
    assert "--dtype" in subprocess.run([sys.executable, "-c", "from microlm.cli import main; main()", "chat", "-h"],
                                       capture_output=True, text=True).stdout
