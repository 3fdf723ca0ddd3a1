"""Fault injection: runs that are killed, share a folder, hit a full disk, get a foreign --out or a bad
value never lose data, never claim to be up to date when they are not, and fail with one line."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from microlm import stages
from microlm.io import COMPLETE, recover_dir, staged_dir, write_json
from microlm.model.checkpoint import read_state
from microlm.stages import load_config
from microlm.stages.ie_data import pipeline

from .conftest import REPO, ZH, write_jsonl

VOCAB = 400
SETS = {"corpus.workers": 0, "tokenizer.vocab_size": VOCAB, "tokenizer.workers": 1, "tokenizer.compare_hf": False,
        "tokens.workers": 1, "pretrain.max_steps": 30, "pretrain.sample_tokens": 0, "pretrain.log_interval": 1,
        "pretrain.ckpt_interval": 5, "pretrain.eval_interval": 10, "pretrain.batch_size": 4, "pretrain.seq_len": 32}


def _sets(run_dir, **extra) -> list[str]:
    return [x for k, v in {"run_dir": str(run_dir), **SETS, **extra}.items() for x in ("--set", f"{k}={v}")]


def microlm(*args, env=None, timeout=600, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microlm.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=timeout,
                          preexec_fn=preexec_fn)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    err = [ln for ln in lines if ": error: " in ln]
    assert len(err) == 1, r.stderr
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """corpus → tokenizer → tokens → pretrain (30 steps), built once, plus the input file."""
    root = tmp_path_factory.mktemp("rel")
    src = write_jsonl(root / "in.jsonl", [f"{ZH[i % len(ZH)]}第{i}段。{ZH[(i * 5) % len(ZH)][:18]}" for i in range(600)])
    cfg = load_config("smoke", {"run_dir": str(root / "runs"), **SETS})
    stages.build("corpus", cfg, input=[str(src)], progress=False)
    stages.build("pretrain", cfg, progress=False)
    return root, cfg, src


def test_out_never_deletes_what_it_did_not_create(tmp_path, built):
    _, _, src = built
    x = tmp_path / "X"
    x.mkdir()
    (x / "notes.txt").write_text("precious", encoding="utf-8")
    (x / "good.jsonl").write_bytes(src.read_bytes())
    r = microlm("corpus", "-p", "smoke", "-q", "--input", x / "good.jsonl", "--out", x, *_sets(tmp_path / "runs"))
    one_line_error(r, "is inside the output folder")
    r = microlm("corpus", "-p", "smoke", "-q", "--input", src, "--out", x, *_sets(tmp_path / "runs"))
    one_line_error(r, "holds files this stage did not write")
    assert sorted(p.name for p in x.iterdir()) == ["good.jsonl", "notes.txt"]
    # a stage folder of another stage is refused too; a file is never replaced by a folder
    r = microlm("corpus", "-p", "smoke", "-q", "--input", src, "--out", built[0] / "runs" / "tokens",
                *_sets(tmp_path / "runs"))
    one_line_error(r, "holds a tokens stage folder")
    f = tmp_path / "a_file"
    f.write_text("keep", encoding="utf-8")
    one_line_error(microlm("corpus", "-p", "smoke", "-q", "--input", src, "--out", f, *_sets(tmp_path / "runs")),
                   "is a file")
    assert f.read_text(encoding="utf-8") == "keep"
    # an empty folder, or the stage's own folder, is fine (and the input inside the target is refused)
    (tmp_path / "empty").mkdir()
    r = microlm("corpus", "-p", "smoke", "-q", "--input", src, "--out", tmp_path / "empty", *_sets(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr
    (tmp_path / "empty" / "mine.jsonl").write_bytes(src.read_bytes())
    one_line_error(microlm("corpus", "-p", "smoke", "-q", "--force", "--input", tmp_path / "empty" / "mine.jsonl",
                           "--out", tmp_path / "empty", *_sets(tmp_path / "runs")), "is inside the output folder")
    assert (tmp_path / "empty" / "mine.jsonl").read_bytes() == src.read_bytes()
    # a foreign file dropped into a finished stage folder is not replaced away by a rebuild
    (tmp_path / "empty" / "mine.jsonl").rename(tmp_path / "empty" / "notes.txt")
    one_line_error(microlm("corpus", "-p", "smoke", "-q", "--force", "--input", src, "--out", tmp_path / "empty",
                           *_sets(tmp_path / "runs")), "did not write, e.g. notes.txt")
    assert (tmp_path / "empty" / "notes.txt").exists()


def test_stop_after_on_a_finished_run_is_refused(built):
    root, cfg, _ = built
    pre = stages.stage_dir(cfg, "pretrain")
    before = (pre / "metrics.jsonl").read_bytes(), (pre / "report.json").read_bytes()
    r = microlm("pretrain", "-p", "smoke", "-q", "--stop-after", 5, *_sets(root / "runs"))
    one_line_error(r, "is a finished run", "--force")
    assert ((pre / "metrics.jsonl").read_bytes(), (pre / "report.json").read_bytes()) == before
    assert stages.status("pretrain", cfg) == "fresh"
    one_line_error(microlm("pretrain", "-p", "smoke", "-q", "--stop-after", -5, *_sets(root / "runs")),
                   "--stop-after must be >= 1")


def test_a_killed_forced_run_is_not_up_to_date_and_resumes(tmp_path, built):
    root, cfg, _ = built
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    for s in ("corpus", "tokenizer", "tokens", "pretrain"):  # a copy of the finished 30-step run
        shutil.copytree(stages.stage_dir(cfg, s), run_dir / s)
    cfg30 = load_config("smoke", {"run_dir": str(run_dir), **SETS})
    cfg400 = load_config("smoke", {"run_dir": str(run_dir), **SETS, "pretrain.max_steps": 400})
    assert stages.status("pretrain", cfg30) == "fresh"
    state = run_dir / "pretrain" / "ckpt" / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "microlm.cli", "pretrain", "-p", "smoke", "-q", "--force",
                             *_sets(run_dir, **{"pretrain.max_steps": 400})], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)

    def new_run_step() -> int:
        try:
            st = json.loads(state.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return -1
        return st["step"] if st.get("train", {}).get("max_steps") == 400 else -1

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and new_run_step() < 10:  # the new run's 2nd checkpoint
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()
    proc.kill()
    proc.wait()
    # the old 30-step manifest no longer vouches for the folder: neither config calls it up to date
    assert stages.status("pretrain", cfg30) == "partial" and stages.status("pretrain", cfg400) == "partial"
    killed_at = read_state(run_dir / "pretrain" / "ckpt")["step"]  # >= 10; a busy machine may have saved more
    assert killed_at >= 10 and killed_at < 400
    r = microlm("pretrain", "-p", "smoke", "-q", "--resume", "--stop-after", killed_at + 5,
                *_sets(run_dir, **{"pretrain.max_steps": 400}))
    assert r.returncode == 0, r.stderr
    assert read_state(run_dir / "pretrain" / "ckpt")["step"] == killed_at + 5
    assert stages.status("pretrain", cfg400) == "partial"  # stopped early: still not finished


def test_a_checkpoint_replacement_killed_at_any_point_recovers(tmp_path):
    """Kill -9 a process that replaces a checkpoint in a loop, at random moments: the checkpoint
    folder is always readable afterwards (recovered from the .tmp/.old folder when the kill fell
    between the two renames) and holds one of the steps that was written."""
    code = r"""
import sys, torch
from microlm.model import ModelConfig, TransformerLM
from microlm.model.checkpoint import save_checkpoint
m = TransformerLM(ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_seq_len=16))
opt = torch.optim.AdamW(m.parameters())
i = int(sys.argv[2])
while True:
    save_checkpoint(sys.argv[1], m, opt, {"step": i, "model": m.cfg.to_dict()})
    i += 1
"""
    import random

    rng = random.Random(7)
    ckpt = tmp_path / "ckpt"
    last = 0
    for _ in range(8):
        p = subprocess.Popen([sys.executable, "-c", code, str(ckpt), str(last)], cwd=REPO,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        while not (ckpt / "state.json").exists() and p.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        state = read_state(ckpt)  # recovers a folder a kill left between the renames
        assert state["step"] >= last
        last = state["step"]
        assert not [x for x in tmp_path.iterdir() if x.name.startswith(".ckpt.")], list(tmp_path.iterdir())


def test_recover_dir_puts_back_the_complete_new_folder(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    out = tmp_path / "ckpt"
    old, new = tmp_path / f".ckpt.old-{pid}", tmp_path / f".ckpt.tmp-{pid}"
    old.mkdir()
    (old / "state.json").write_text('{"step": 1}')
    new.mkdir()
    (new / "state.json").write_text('{"step": 2}')
    (new / COMPLETE).touch()
    assert recover_dir(out) and json.loads((out / "state.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # an incomplete new folder (killed while writing) is dropped; the old one comes back
    shutil_old = tmp_path / f".ckpt.old-{pid}"
    os.rename(out, shutil_old)
    (tmp_path / f".ckpt.tmp-{pid}").mkdir()
    assert recover_dir(out) and json.loads((out / "state.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # a live writer's temp folder is left alone
    live = tmp_path / f".ckpt.tmp-{os.getpid()}"
    live.mkdir()
    assert not recover_dir(out) and live.exists()


def test_a_full_disk_is_one_line_and_leaves_no_temp_folder(tmp_path, built):
    _, _, src = built
    big = write_jsonl(tmp_path / "big.jsonl", [f"{ZH[i % 6]}{ZH[(i * 5) % 6]}第{i}篇，编号{i * 7919}。" for i in range(3000)])

    def limit():  # a 64 KiB file size limit: writes fail with EFBIG (the signal would kill instead)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    r = microlm("corpus", "-p", "smoke", "-q", "--input", big, "--out", tmp_path / "c", *_sets(tmp_path / "runs"),
                preexec_fn=limit)
    one_line_error(r, "size limit")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.") and p.name != ".c.lock"], \
        list(tmp_path.iterdir())
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_a_full_disk_while_training_is_one_line(tmp_path, built):
    root = built[0]

    def limit():  # the checkpoint (a few hundred KiB) outgrows a 64 KiB limit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    r = microlm("pretrain", "-p", "smoke", "-q", "--force", "--out", tmp_path / "p", *_sets(root / "runs"),
                preexec_fn=limit)
    one_line_error(r, "while writing a checkpoint", "size limit")
    assert not [p for p in (tmp_path / "p").rglob(".ckpt.*")] and not (tmp_path / "p" / "manifest.json").exists()


def test_a_second_run_on_the_same_folder_stops_with_the_holders_pid(tmp_path, built):
    _, _, src = built
    out = tmp_path / "c"
    with stages.folder_lock(out, "corpus"):
        r = microlm("corpus", "-p", "smoke", "-q", "--input", src, "--out", out, *_sets(tmp_path / "runs"))
    one_line_error(r, "being built by another run", f"pid {os.getpid()}")
    r = microlm("corpus", "-p", "smoke", "-q", "--input", src, "--out", out, *_sets(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr  # the lock is gone with its holder


def test_freshness_checks_every_file_it_wrote(built, tmp_path):
    root, cfg, _ = built
    tok = stages.stage_dir(cfg, "tokenizer")
    assert stages.status("tokenizer", cfg) == "fresh"
    m = stages.manifest("tokenizer", cfg)
    assert "microlm_tokenizer.json" in m["files"] and all("digest" in v for v in m["files"].values())
    backup, merges = (tok / "microlm_tokenizer.json").read_bytes(), (tok / "merges.txt").read_bytes()
    try:
        (tok / "microlm_tokenizer.json").unlink()
        assert stages.status("tokenizer", cfg) == "stale"
        (tok / "microlm_tokenizer.json").write_bytes(backup)
        assert stages.status("tokenizer", cfg) == "fresh"
        (tok / "merges.txt").write_text("hand edited\n", encoding="utf-8")
        assert stages.status("tokenizer", cfg) == "stale"
    finally:  # the module's built stages are shared: leave them as they were (fresh again)
        (tok / "microlm_tokenizer.json").write_bytes(backup)
        (tok / "merges.txt").write_bytes(merges)
    assert stages.status("tokenizer", cfg) == "fresh"


def test_ie_data_step_marks_the_stage_partial(tmp_cfg, monkeypatch):
    monkeypatch.delenv("MICROLM_DATA", raising=False)
    cfg = tmp_cfg()
    stages.build("ie_data", cfg, progress=False)
    assert stages.status("ie_data", cfg) == "fresh"
    three = tmp_cfg(**{"ie_data.eval_prompts": 3})
    stages.build("ie_data", three, progress=False, step=5)
    assert stages.status("ie_data", cfg) == "partial" and stages.status("ie_data", three) == "partial"
    stages.build("ie_data", cfg, progress=False)  # not "up to date": the steps run again
    assert stages.manifest("ie_data", cfg)["metrics"]["eval_prompts"] == 40
    assert sum(1 for _ in open(stages.stage_dir(cfg, "ie_data") / "06_eval_prompts.jsonl")) == 40


BAD = {
    "zero heads": (["--set", "model.n_heads=0"], "n_heads"),
    "negative heads": (["--set", "model.n_heads=-2"], "n_heads"),
    "ie split_num 0": (["--set", "ie_data.split_num=0"], "ie_data.split_num"),
    "ie val_fraction 2": (["--set", "ie_data.val_fraction=2.0"], "ie_data.val_fraction"),
    "model vocab": (["--set", "model.vocab_size=99"], "model.vocab_size is not a setting"),
    # GPU 64 exists nowhere: one line on a CPU-only torch ("sees no CUDA") and on a GPU machine alike
    "cuda that is not there": (["--set", "pretrain.device=cuda:64"], "'cuda:64' asked for"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_are_one_line(case, tmp_path, built):
    args, needle = BAD[case]
    if case.startswith("cuda"):
        root = built[0]
        r = microlm("pretrain", "-p", "smoke", "-q", "--force", "--out", tmp_path / "p", *args, *_sets(root / "runs"))
    else:
        r = microlm("config", "-p", "smoke", *args)
    one_line_error(r, needle)


def test_bad_files_are_one_line(tmp_path, built):
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    one_line_error(microlm("config", "-p", empty), "the config is empty")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("profile: smoke\nseed: 1\n# caf\xe9\n".encode("latin-1"))
    one_line_error(microlm("config", "-p", latin), "not UTF-8")
    a_file = tmp_path / "runs_file"
    a_file.write_text("x", encoding="utf-8")
    one_line_error(microlm("corpus", "-p", "smoke", "-q", "--input", built[2], "--set", f"run_dir={a_file}"),
                   str(a_file))
    # a hand-edited state.json of the wrong shape
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "state.json").write_text("[1, 2]", encoding="utf-8")
    one_line_error(microlm("chat", "-p", "smoke", "--model", ck), "corrupt checkpoint file")


def test_written_files_are_readable_by_others(tmp_path, hf_folder):
    write_json(tmp_path / "r.json", {"a": 1})
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~_umask()
    # an export and an adapter (safetensors writes 0600 files by itself) can be served by another account
    for p in [*(hf_folder / "hf").rglob("*"), *(hf_folder / "adapter").rglob("*")]:
        want = 0o777 & ~_umask() if p.is_dir() else 0o666 & ~_umask()
        assert p.stat().st_mode & 0o777 == want, p


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_the_debug_switch_shows_the_traceback(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    r = microlm("config", "-p", empty, env={"MICROLM_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "ConfigError" in r.stderr



@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, chat_tok):
    import torch

    from microlm.infer.config import GenerationConfig
    from microlm.model import ModelConfig, TransformerLM
    from microlm.model.hf_export import export_hf
    from microlm.model.lora import LoRAConfig, apply_lora, save_adapter

    d = tmp_path_factory.mktemp("damaged")
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=chat_tok.vocab_size, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                      max_seq_len=64)).eval()
    export_hf(model, chat_tok, d / "hf", GenerationConfig(max_new_tokens=4))
    lcfg = LoRAConfig(r=2, targets=["q", "v"])
    apply_lora(model, lcfg)
    save_adapter(model, lcfg, d / "adapter")
    return d


def _damage(src: Path, dst: Path, name: str, how) -> Path:
    shutil.copytree(src, dst)
    p = dst / name
    if callable(how):
        p.write_bytes(how(p.read_bytes()))
    else:
        p.write_text(how, encoding="utf-8")
    return dst


DAMAGED_HF = {
    "config not JSON": ("config.json", "{nope", "is not valid JSON (line 1"),
    "config missing key": ("config.json", lambda b: json.dumps({k: v for k, v in json.loads(b).items()
                                                                 if k != "hidden_size"}).encode(),
                           "the key 'hidden_size' is missing"),
    "config zero heads": ("config.json", lambda b: json.dumps({**json.loads(b), "num_attention_heads": 0}).encode(),
                          "num_attention_heads must be a positive integer"),
    "config size mismatch": ("config.json", lambda b: json.dumps({**json.loads(b), "intermediate_size": 128}).encode(),
                             "do not fit its config.json"),
    "tokenizer not JSON": ("tokenizer.json", "{bad", "is not valid JSON"),
    "tokenizer a list": ("tokenizer.json", "[1, 2]", "holds a JSON list"),
    "weights truncated": ("model.safetensors", lambda b: b[: len(b) // 2], "corrupt safetensors file"),
}


@pytest.mark.parametrize("case", list(DAMAGED_HF))
def test_damaged_hf_folders_are_one_line(case, hf_folder, tmp_path):
    name, how, needle = DAMAGED_HF[case]
    bad = _damage(hf_folder / "hf", tmp_path / "hf", name, how)
    one_line_error(microlm("import-hf", bad, "--out", tmp_path / "imp"), needle)
    assert not (tmp_path / "imp" / "ckpt").exists()


@pytest.mark.parametrize("name,how,needle", [
    ("adapter_model.safetensors", lambda b: os.urandom(100), "corrupt safetensors file"),
    ("adapter_config.json", "[]", "holds a JSON list"),
    ("adapter_config.json", '{"r": "x", "lora_alpha": 1}', "need numeric r"),
])
def test_damaged_adapters_are_one_line(name, how, needle, hf_folder, tmp_path):
    bad = _damage(hf_folder / "adapter", tmp_path / "adapter", name, how)
    r = subprocess.run([sys.executable, "-m", "microlm.cli", "chat", "-p", "smoke", "--json", "--model",
                        hf_folder / "hf", "--adapter", bad], input="你好\n", capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    one_line_error(r, needle)


def test_chat_json_reports_a_failed_turn_and_exits_non_zero(hf_folder):
    long = "长" * 200  # longer than the 64-token context
    r = subprocess.run([sys.executable, "-m", "microlm.cli", "chat", "-p", "smoke", "--json", "--model",
                        hf_folder / "hf", "--max-new-tokens", "4", "--temperature", "0", "--context", "error"],
                       input=f"你好\n{long}\n", capture_output=True, text=True, cwd=REPO, timeout=300)
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [sorted(x) for x in rows][1] == ["error", "user"] and "assistant" in rows[0], rows
    assert r.returncode == 1 and "chat: error:" in r.stderr


@pytest.mark.parametrize("damage,needle", [
    (lambda b: b[:12], "not a JSON line"),  # a cut line
    (lambda b: os.urandom(64) + b, "not UTF-8"),
    (lambda b: b"\n" + b, "not a JSON line"),  # a blank line
    (lambda b: b'{"id": "x", "cate": "\xe4\xba\xba"}\n' + b, "a record of the wrong shape"),
    (lambda b: b'{"id": "x", "cate": "\xe4\xba\xba", "text": "t", "source": "s", "relation": []}\n' + b,
     "a record of the wrong shape"),
])
def test_a_damaged_ie_intermediate_file_names_file_and_line(damage, needle, tmp_cfg, monkeypatch):
    from microlm.errors import MicroLMError
    from microlm.ie.pipeline import run_step

    monkeypatch.delenv("MICROLM_DATA", raising=False)
    cfg = tmp_cfg()
    out = cfg.run_path / "ie"
    run_step(pipeline(cfg), 2, out)
    f = out / "02_filtered.jsonl"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(MicroLMError, match=needle) as e:
        run_step(pipeline(cfg), 3, out)
    assert "02_filtered.jsonl:" in str(e.value)


def test_display_path_never_shows_the_machines_absolute_paths(tmp_path, monkeypatch):
    from microlm.paths import REPO_ROOT, display_path

    assert display_path(REPO_ROOT / "runs" / "cpu" / "ie_data") == "runs/cpu/ie_data"
    assert display_path("runs/smoke/hf") == "runs/smoke/hf" and display_path("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"
    monkeypatch.setenv("MICROLM_RUNS", str(tmp_path / "r"))
    assert display_path(tmp_path / "r" / "smoke" / "hf") == "$MICROLM_RUNS/smoke/hf"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert display_path(tmp_path / "models" / "x") == "~/models/x"


def test_an_interrupted_training_stage_goes_on_by_itself(tmp_cfg, tmp_path, capsys):
    """`make course` again after Ctrl-C (or a kill): the training stage resumes its own interrupted run
    from the last checkpoint — same steps and losses as an uninterrupted run — but only when config,
    upstream and inputs are the same; a changed config starts over."""
    from microlm.train.curves import read_metrics

    cfg = tmp_cfg(**{"pretrain.ckpt_interval": 5})
    ref = stages.build("pretrain", cfg, progress=False, out_dir=tmp_path / "ref")
    stages.build("pretrain", cfg, progress=False, stop_after=10)
    assert stages.status("pretrain", cfg) == "partial"
    capsys.readouterr()
    folder = stages.build("pretrain", cfg, progress=False)  # no --resume: what a re-run of the course does
    assert "at step 10" in capsys.readouterr().out and stages.status("pretrain", cfg) == "fresh"
    got, ref_rows = read_metrics(folder)[0], read_metrics(ref)[0]
    assert [(r["step"], r["loss"]) for r in got] == [(r["step"], r["loss"]) for r in ref_rows]
    # an interrupted run of another config is not continued
    other = tmp_cfg(**{"pretrain.ckpt_interval": 5, "pretrain.lr": 0.001})
    stages.build("pretrain", other, progress=False, out_dir=tmp_path / "x", stop_after=10)
    capsys.readouterr()
    stages.build("pretrain", cfg, progress=False, out_dir=tmp_path / "x")
    assert "resumed" not in capsys.readouterr().out
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "x")[0]] == [(r["step"], r["loss"]) for r in ref_rows]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stage_stopped_by_kill_or_ctrl_c_removes_its_staging_folder_at_once(tmp_path, sig):
    """What ie_merged writes (a 1–3 GB folder) is staged beside its place; `kill` or Ctrl-C while it
    is written or verified removes the staging folder before the process exits (the CLI turns SIGTERM
    into the interrupt Ctrl-C raises); after a SIGKILL the next write removes what is left."""
    code = r"""
import sys, time
from pathlib import Path
from microlm.cli import term_as_interrupt
from microlm.io import staged_dir
with term_as_interrupt():
    with staged_dir(Path(sys.argv[1])) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 1000)
        print("ready", flush=True)
        time.sleep(120)
"""
    out = tmp_path / "merged"
    # started with SIGINT ignored, as a shell's background job is: Ctrl-C / kill -INT must still stop it
    p = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert p.stdout.readline().strip() == "ready"
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".merged.tmp")]
    t0 = time.time()
    p.send_signal(sig)
    p.wait(timeout=60)
    assert p.returncode != 0 and time.time() - t0 < 30
    assert list(tmp_path.iterdir()) == []  # no staging folder, no half-written output
    p = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert [x.name for x in tmp_path.iterdir()] != []  # SIGKILL cannot be caught: the leftover stays ...
    with staged_dir(out) as tmp:
        (tmp / "ok").write_text("1")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["merged"]  # ... until the next write removes it


# --- pipeline B and the CLI's smaller probes (issue 27) --------------------------------------------------------

def test_stop_after_at_or_past_max_steps_is_a_finished_fresh_run(tmp_path, built):
    """The probe: ``--stop-after`` ≥ ``max_steps`` trained every step yet left the run ``partial``."""
    _, cfg, _ = built
    out = stages.build("pretrain", cfg, out_dir=tmp_path / "p", stop_after=cfg.pretrain.max_steps + 5, progress=False)
    m = stages.read_manifest(out)
    assert m is not None and m["metrics"]["steps"] == cfg.pretrain.max_steps
    assert stages.is_fresh(out, stages.current_fingerprint("pretrain", cfg))
    short = stages.build("pretrain", cfg, out_dir=tmp_path / "q", stop_after=5, progress=False)
    assert stages.read_manifest(short) is None and read_state(short / "ckpt")["step"] == 5  # cut short: no manifest


def test_a_full_disk_while_exporting_names_the_file_and_writes_no_folder(tmp_path, built):
    root = built[0]

    def limit():  # the exported weights (a few hundred KiB) outgrow a 64 KiB limit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    r = microlm("hf", "-p", "smoke", "-q", "--source", "pretrain", "--out", tmp_path / "h", *_sets(root / "runs"),
                preexec_fn=limit)
    err = one_line_error(r, "while writing the exported weights", "size limit", "model.safetensors")
    assert "?" not in err and "named no file" not in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".h.tmp")]
    assert not (tmp_path / "h" / "manifest.json").exists() and not (tmp_path / "h" / "model.safetensors").exists()


def test_a_write_that_names_no_file_is_reported_with_the_file_it_was_for(tmp_path):
    import errno

    from microlm.cli import one_line
    from microlm.io import atomic_open, reported_write

    with pytest.raises(OSError) as e, atomic_open(tmp_path / "out.json") as f:
        f.write("x")
        raise OSError(errno.ENOSPC, "No space left on device")  # what f.write raises on a full disk
    assert e.value.filename == str(tmp_path / "out.json") and "the disk is full" in one_line(e.value)
    assert not list(tmp_path.iterdir())  # no temp file left
    with pytest.raises(OSError) as e, reported_write(tmp_path / "w.pt", "saving"):
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "w.pt") and "while saving" in str(e.value)
    with pytest.raises(RuntimeError, match="an index bug"), reported_write(tmp_path / "w.pt"):
        raise RuntimeError("an index bug")  # a genuine bug keeps its own exception


def test_chat_flags_that_cannot_work_are_one_line(hf_folder):
    one_line_error(microlm("chat", "-p", "smoke", "--tokenizer", hf_folder / "hf", "--json"),
                   "--tokenizer", "needs --model")
    r = subprocess.run([sys.executable, "-m", "microlm.cli", "chat", "-p", "smoke", "--model", str(hf_folder / "hf"),
                        "--max-new-tokens", "100000", "--json"], input="你好\n", capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    err = one_line_error(r, "max_new_tokens 100000 leaves no room", "context is 64 tokens")
    assert "message too long" not in err


def test_a_record_cut_at_the_end_is_named_by_its_own_byte(tmp_path):
    from microlm.errors import MicroLMError
    from microlm.tokenizer.bpe import iter_file_texts

    good = "".join(json.dumps({"text": f"第{i}段"}, ensure_ascii=False) + "\n" for i in range(50))
    p = tmp_path / "cut.jsonl"
    p.write_text(good + '{"text": "被截断', encoding="utf-8")
    at = len(good.encode("utf-8"))
    for block in (1 << 22, 64):  # one block, and many blocks (the record in the last one)
        with pytest.raises(MicroLMError, match=rf"line at byte {at} is not a"):
            list(iter_file_texts(p, block_bytes=block))
    half = len(good.encode("utf-8")) // 2
    start = good.encode("utf-8").index(b"\n", half) + 1  # a worker's chunk starting mid-file
    with pytest.raises(MicroLMError, match=rf"line at byte {at} is not a"):
        list(iter_file_texts(p, start=start, block_bytes=64))
