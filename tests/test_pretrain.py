"""Pretraining loop: schedule, decay groups, exact resume after a kill, DDP == one process, bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from microlm import stages
from microlm.errors import MicroLMError
from microlm.model import ModelConfig, TransformerLM
from microlm.model.checkpoint import load_checkpoint, save_checkpoint
from microlm.stages import load_config
from microlm.train.curves import read_metrics
from microlm.train.pretrain import WindowBatches, check_token_range
from microlm.train.settings import TrainConfig
from microlm.train.trainer import Trainer, lr_at, param_groups

from .conftest import REPO, ZH, write_jsonl

VOCAB = 400


def overrides(run_dir, **extra):
    base = {"run_dir": str(run_dir), "corpus.workers": 0, "tokenizer.vocab_size": VOCAB, "tokenizer.workers": 1,
            "tokenizer.compare_hf": False, "tokens.workers": 1,
            "pretrain.max_steps": 40, "pretrain.sample_tokens": 0, "pretrain.log_interval": 1,
            "pretrain.ckpt_interval": 10, "pretrain.eval_interval": 10}
    base.update(extra)
    return base


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """corpus → tokenizer (400 ids) → token files, built once for the module."""
    root = tmp_path_factory.mktemp("pre")
    docs = [f"{ZH[i % len(ZH)]}第{i}段：{ZH[(i * 7) % len(ZH)][:20]}" for i in range(1500)]
    src = write_jsonl(root / "in.jsonl", docs)
    cfg = load_config("smoke", overrides(root / "runs"))
    stages.build("corpus", cfg, input=[str(src)], progress=False)
    stages.build("tokens", cfg, progress=False)
    return root / "runs"


def cli(args, run_dir, *, env_extra=None, **extra):
    sets = [x for k, v in overrides(run_dir, **extra).items() for x in ("--set", f"{k}={v}")]
    env = {**os.environ, **(env_extra or {})}
    return [sys.executable, "-m", "microlm.cli", *args, "-p", "smoke", "-q", *sets], env


def train_losses(out_dir):
    train, evals = read_metrics(out_dir)
    return [(r["step"], r["loss"]) for r in train], [(r["step"], r["val_loss"]) for r in evals]


def test_lr_schedule_warms_up_then_decays_to_min():
    c = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, c) == pytest.approx(1e-4)
    assert lr_at(9, c) == pytest.approx(1e-3)
    assert lr_at(60, c) == pytest.approx(5.5e-4)
    assert lr_at(110, c) == pytest.approx(1e-4)
    lrs = [lr_at(s, c) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_no_weight_decay_on_norms_and_embeddings_unless_asked():
    m = TransformerLM(ModelConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_seq_len=8))
    decay, no = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert {names[id(p)] for p in no["params"]} == {"embed.weight", "layers.0.input_norm.weight",
                                                     "layers.0.post_attn_norm.weight", "norm.weight"}
    assert "lm_head.weight" in {names[id(p)] for p in decay["params"]}
    decay2, _ = param_groups(m, 0.1, decay_embeddings=True)
    assert "embed.weight" in {names[id(p)] for p in decay2["params"]}


def test_batches_are_a_function_of_seed_and_step_and_split_exactly(data_dir):
    b = WindowBatches(data_dir / "tokens" / "train.bin", 16, 8, seed=5)
    x1, _ = b.get(3, 0, 1, 0, 1)
    x2, _ = WindowBatches(data_dir / "tokens" / "train.bin", 16, 8, seed=5).get(3, 0, 1, 0, 1)
    assert torch.equal(x1, x2)
    parts = [b.get(3, m, 2, r, 2)[0] for r in range(2) for m in range(2)]
    assert sorted(map(tuple, torch.cat(parts).tolist())) == sorted(map(tuple, x1.tolist()))
    assert not torch.equal(b.get(4, 0, 1, 0, 1)[0], x1)


def test_pretrain_learns_and_writes_its_artifacts(data_dir):
    cfg = load_config("smoke", overrides(data_dir))
    out = stages.build("pretrain", cfg, progress=False)
    rep = json.loads((out / "report.json").read_text())
    train, evals = train_losses(out)
    assert len(train) == 40 and [s for s, _ in evals] == [10, 20, 30, 40]
    assert train[-1][1] < train[0][1] - 0.5, "loss must fall"
    assert rep["final_val_loss"] < np.log(VOCAB)
    assert 0 < rep["final_val_bpb"] < 8
    assert (out / "ckpt" / "model.safetensors").is_file() and (out / "curves.png").is_file()
    m = stages.read_manifest(out)
    assert m["metrics"]["params"] == TransformerLM(cfg.model).num_parameters()
    mtime = (out / "report.json").stat().st_mtime_ns
    stages.build("pretrain", cfg, progress=False)  # unchanged: skipped
    assert (out / "report.json").stat().st_mtime_ns == mtime


def test_compiled_pretraining_follows_the_eager_curve_and_says_how_it_ran(data_dir, tmp_path):
    """``compile: true`` (torch.compile, inductor's CPU backend) trains the same curve as eager up to
    rounding, saves a checkpoint the eager model loads, and the report records the speed setup."""
    losses, reports = {}, {}
    for mode in (False, True):
        cfg = load_config("smoke", overrides(data_dir, **{"pretrain.max_steps": 12, "pretrain.compile": mode,
                                                          "pretrain.precision": "fp32"}))
        out = stages.build("pretrain", cfg, out_dir=tmp_path / f"compile-{mode}", progress=False)
        losses[mode] = [loss for _, loss in train_losses(out)[0]]
        reports[mode] = json.loads((out / "report.json").read_text())
    assert np.allclose(losses[True], losses[False], atol=2e-3), (losses[True], losses[False])
    speed = reports[True]["speed"]
    assert speed["compile"] is True and speed["precision"] == "fp32" and speed["threads"] >= 1
    assert "busy" in speed and reports[False]["speed"]["compile"] is False
    model = TransformerLM(cfg.model)
    load_checkpoint(tmp_path / "compile-True" / "ckpt", model)  # plain parameter names, no _orig_mod.
    assert stages.read_manifest(tmp_path / "compile-True")["metrics"]["speed"]["compile"] is True


def test_resume_after_kill_is_bit_identical(data_dir, tmp_path):
    steps = {"pretrain.max_steps": 60}
    ref_out = tmp_path / "ref"
    cmd, env = cli(["pretrain", "--out", str(ref_out)], data_dir, **steps)
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]

    out = tmp_path / "killed"
    cmd, env = cli(["pretrain", "--out", str(out)], data_dir, **steps)
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "ckpt" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 20:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run must really be killed mid-way"
    killed_at = json.loads(state.read_text())["step"]
    assert killed_at < 60

    cmd, env = cli(["pretrain", "--out", str(out), "--resume"], data_dir, **steps)
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"at step {killed_at}" in r.stdout
    ref_train, ref_eval = train_losses(ref_out)
    got_train, got_eval = train_losses(out)
    assert got_train == ref_train  # every step, exactly (the lines after the checkpoint were rewritten)
    assert got_eval == ref_eval


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(data_dir, tmp_path):
    steps = {"pretrain.max_steps": 12, "pretrain.batch_size": 8}
    one, two, accum = tmp_path / "one", tmp_path / "two", tmp_path / "accum"
    cmd, env = cli(["pretrain", "--out", str(one)], data_dir, **steps)
    assert subprocess.run(cmd, env=env, cwd=REPO, capture_output=True).returncode == 0
    cmd, env = cli(["pretrain", "--out", str(accum)], data_dir, **steps, **{"pretrain.micro_batch_size": 2})
    assert subprocess.run(cmd, env=env, cwd=REPO, capture_output=True).returncode == 0
    cmd, env = cli(["pretrain", "--out", str(two)], data_dir, **steps, env_extra={"OMP_NUM_THREADS": "1"})
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "microlm.cli", *cmd[3:]]
    r = subprocess.run(torchrun, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    a, _ = train_losses(one)
    b, _ = train_losses(two)
    c, _ = train_losses(accum)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 13))
    assert np.allclose([x for _, x in a], [x for _, x in b], atol=2e-4), (a, b)
    assert np.allclose([x for _, x in a], [x for _, x in c], atol=2e-4), (a, c)
    assert a[-1][1] < a[0][1]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    cfg = load_config("smoke", overrides(data_dir, **{"pretrain.ckpt_interval": 2}))
    torch.manual_seed(0)
    model = TransformerLM(cfg.model)
    batches = WindowBatches(data_dir / "tokens" / "train.bin", 16, 4, seed=0)

    def poison(step, rec):
        if step == 3:
            with torch.no_grad():
                model.norm.weight.fill_(float("nan"))

    tc = TrainConfig(**{**cfg.pretrain.__dict__, "seq_len": 16, "batch_size": 4})
    t = Trainer(model, tc, tmp_path / "nan", batches=batches, progress=False, on_step=poison)
    with pytest.raises(MicroLMError, match="loss became nan at step 3"):
        t.fit()
    assert json.loads((tmp_path / "nan" / "ckpt" / "state.json").read_text())["step"] == 2


def test_bad_checkpoints_and_resume_errors(data_dir, tmp_path):
    cfg = load_config("smoke", overrides(data_dir))
    model = TransformerLM(cfg.model)
    ck = tmp_path / "ck"
    with pytest.raises(MicroLMError, match="no checkpoint to resume from"):
        load_checkpoint(ck, model)
    save_checkpoint(ck, model, None, {"step": 1, "model": cfg.model.to_dict()})
    other = {**cfg.model.to_dict(), "dim": 128, "n_layers": 3}
    with pytest.raises(MicroLMError, match=r"model\.dim: 64 \(checkpoint\) != 128.*model\.n_layers"):
        load_checkpoint(ck, model, expect={"model": other})
    (ck / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MicroLMError, match="corrupt checkpoint file .*model.safetensors"):
        load_checkpoint(ck, model)
    (ck / "model.safetensors").unlink()
    with pytest.raises(MicroLMError, match="checkpoint file missing: .*model.safetensors"):
        load_checkpoint(ck, model)
    # the CLI: one line, exit 2
    cmd, env = cli(["pretrain", "--out", str(tmp_path / "empty"), "--resume"], data_dir)
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "no checkpoint to resume from" in r.stderr and r.stderr.count("\n") == 1


def test_token_ids_beyond_the_vocab_are_refused(tmp_path):
    np.array([1, 2, 500], dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(MicroLMError, match="token id 500 >= vocab_size 400"):
        check_token_range(tmp_path / "t.bin", 400)
    assert check_token_range(tmp_path / "t.bin", 501) == 500
