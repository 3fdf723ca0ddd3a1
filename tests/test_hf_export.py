"""Stage A8: the Hugging Face export and import, and the chat CLI in a real pseudo-terminal."""

import dataclasses
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from microlm.errors import MicroLMError
from microlm.infer.config import GenerationConfig
from microlm.infer.generate import generate_ids
from microlm.infer.verify import verify_export
from microlm.model import ModelConfig, TransformerLM, load_model
from microlm.model.hf_export import (
    export_hf,
    import_checkpoint,
    import_hf,
    model_config_from_llama,
)
from microlm.model.lora import LoRAConfig, apply_lora, lora_modules
from microlm.tokenizer import render_chat

from .conftest import REPO, ZH

PROMPTS = ["北京是中华人民共和国的首都，也是", "机器学习是人工智能的一个分支", "今天天气很好 hello 123"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, chat_tok):
    d = tmp_path_factory.mktemp("hfexport")
    tok = chat_tok
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=448, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=192)
    model = TransformerLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so greedy decoding is not trivially constant
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    export_hf(model, tok, d / "hf", GenerationConfig(temperature=0.6, top_p=0.8))
    return model, tok, d / "hf"


def hf(folder):
    import transformers

    return (transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(),
            transformers.AutoTokenizer.from_pretrained(str(folder)))


def test_export_folder_has_everything_transformers_needs(exported):
    model, tok, folder = exported
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"):
        assert (folder / f).is_file(), f
    gc = json.loads((folder / "generation_config.json").read_text())
    assert sorted(gc["eos_token_id"]) == sorted([tok.special_ids["<|im_end|>"], tok.special_ids["<|endoftext|>"]])
    assert gc["temperature"] == 0.6 and gc["top_p"] == 0.8 and gc["do_sample"] is True
    conf = json.loads((folder / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForCausalLM"] and conf["num_key_value_heads"] == 2
    assert "auto_map" not in conf  # no custom code


def test_transformers_gives_our_logits_greedy_tokens_and_chat_template(exported):
    model, tok, folder = exported
    hm, ht = hf(folder)
    for p in PROMPTS:
        ids = tok.encode(p)
        assert ht(p, add_special_tokens=False)["input_ids"] == ids
        x = torch.tensor([ids])
        with torch.no_grad():
            assert (model(x)[0] - hm(x).logits).abs().max().item() <= 1e-4
            theirs = hm.generate(x, max_new_tokens=64, min_new_tokens=64, do_sample=False, eos_token_id=None,
                                 pad_token_id=tok.eos_id, repetition_penalty=1.3)[0, len(ids):].tolist()
        ours = generate_ids(model, [ids], max_new_tokens=64, temperature=0, repetition_penalty=1.3,
                            ignore_eos=True)[0]
        assert ours == theirs and len(set(ours)) > 3
    msgs = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "再见<|im_end|>"}]
    text = ht.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == render_chat(msgs, add_generation_prompt=True)
    # verify_export (used by the stage) agrees
    check = verify_export(folder, model, tok)
    assert check["checked"] and check["logits_max_abs_diff"] <= 1e-4 and check["greedy_tokens_equal"]
    assert check["chat_template_equal"]


def test_batched_left_padded_generation_matches_transformers(exported):
    model, tok, folder = exported
    hm, ht = hf(folder)
    prompts = [tok.encode(p) for p in PROMPTS]
    ours = generate_ids(model, prompts, max_new_tokens=24, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    ht.padding_side = "left"
    batch = ht(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = hm.generate(**batch, max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=tok.eos_id, repetition_penalty=1.0)
    assert out[:, batch["input_ids"].shape[1]:].tolist() == ours


def test_import_back_is_exact_and_lora_is_merged_on_export(exported, tmp_path):
    model, tok, folder = exported
    m2, tok2 = import_hf(folder)
    sd, sd2 = model.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    for p in PROMPTS + ["<|im_start|>user\n你好<|im_end|>"]:
        assert tok2.encode(p) == tok.encode(p) and tok2.encode_ordinary(p) == tok.encode_ordinary(p)
    # a model with LoRA adapters exports merged weights and stays unmerged itself
    lm = TransformerLM(model.cfg)
    lm.load_state_dict(sd)
    apply_lora(lm, LoRAConfig(r=4, alpha=8.0, targets=["q", "v", "down"]))
    with torch.no_grad():
        for mod in lora_modules(lm).values():
            for b in mod.lora_B:
                b.normal_(0, 0.1)
    export_hf(lm.eval(), tok, tmp_path / "merged")
    assert not any(m.merged for m in lora_modules(lm).values())
    merged, _ = import_hf(tmp_path / "merged")
    x = torch.tensor([tok.encode(PROMPTS[0])])
    with torch.no_grad():
        assert (merged(x)[0] - lm(x)[0]).abs().max().item() < 1e-4
        assert (merged(x)[0] - model(x)[0]).abs().max().item() > 1e-3


def test_imported_checkpoint_trains_further_with_our_trainer(exported, tmp_path):
    from microlm.train.curves import read_metrics
    from microlm.train.pretrain import WindowBatches
    from microlm.train.settings import TrainConfig
    from microlm.train.trainer import Trainer

    model, tok, folder = exported
    out = import_checkpoint(folder, tmp_path / "imported")
    m, t = load_model(out)
    x = torch.tensor([tok.encode(PROMPTS[1])])
    with torch.no_grad():
        assert torch.equal(m(x)[0], model(x)[0])
    np.array([t for d in ZH * 20 for t in [*tok.encode(d), tok.eos_id]], dtype=np.uint16).tofile(tmp_path / "train.bin")
    tc = TrainConfig(batch_size=8, seq_len=32, max_steps=30, lr=3e-3, min_lr=3e-4, warmup_steps=3,
                     eval_interval=100, ckpt_interval=30, log_interval=1, sample_tokens=0, device="cpu")
    Trainer(m, tc, tmp_path / "cont", batches=WindowBatches(tmp_path / "train.bin", 32, 8, seed=0),
            progress=False, run_meta={"model": m.cfg.to_dict()}).fit()
    train, _ = read_metrics(tmp_path / "cont")
    first, last = train[0]["loss"], sum(r["loss"] for r in train[-5:]) / 5
    assert last < first - 0.5, (first, last)


@pytest.mark.parametrize("change,msg", [({"model_type": "qwen2"}, "only Llama-layout"),
                                        ({"attention_bias": True}, "attention_bias"),
                                        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
                                        ({"hidden_act": "gelu"}, "hidden_act")])
def test_import_refuses_what_we_do_not_implement(exported, change, msg):
    conf = json.loads((exported[2] / "config.json").read_text())
    with pytest.raises(MicroLMError, match=msg):
        model_config_from_llama({**conf, **change})


def spawn_chat(folder, *flags, sigint=signal.SIG_DFL):
    """``microlm chat`` in a pseudo-terminal, started with SIGINT set to ``sigint`` (whatever this
    test process inherited: a runner started as a shell's background job has it ignored).  Every
    wait is on what the chat prints; the timeout only bounds a hang on a slow, busy machine."""
    pexpect = pytest.importorskip("pexpect")
    return pexpect, pexpect.spawn(sys.executable, ["-m", "microlm.cli", "chat", "--model", str(folder), *flags],
                                  cwd=str(REPO), encoding="utf-8", timeout=180,
                                  env={"PYTHONIOENCODING": "utf-8", "PATH": "/usr/bin:/bin", "TERM": "dumb"},
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


def exit_chat(pexpect, child):
    child.expect("user> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_cli_two_turns_in_a_pseudo_terminal(exported):
    pexpect, child = spawn_chat(exported[2], "--max-new-tokens", "12", "--temperature", "0")
    child.expect("MicroLM chat")
    child.expect("user> ")
    child.sendline("你好")
    child.expect("assistant> ")
    child.expect(r"\[(\d+) tokens, [\d.]+ tokens/s")
    child.expect("user> ")
    child.sendline("/system 你是一个助手")
    child.expect("system prompt set")
    child.expect("user> ")
    child.sendline("北京是哪个国家的首都？")
    child.expect(r"tokens/s")
    exit_chat(pexpect, child)


def test_chat_cli_pipe_mode_bad_utf8_and_bad_adapter(exported):
    folder = exported[2]
    cmd = [sys.executable, "-m", "microlm.cli", "chat", "--model", str(folder), "--max-new-tokens", "8",
           "--temperature", "0", "--json"]
    r = subprocess.run(cmd, input=b"\xff\xfe\xe4\xbd hello\n\xe4\xbd\xa0\xe5\xa5\xbd\n", capture_output=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    lines = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [x["user"] for x in lines] == ["\ufffd\ufffd\ufffd hello", "你好"]
    assert all(x["tokens"] >= 1 for x in lines)
    assert "not valid UTF-8" in r.stderr.decode()
    r = subprocess.run(cmd + ["--adapter", str(folder / "missing")], input=b"hi\n", capture_output=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.decode().strip().endswith(f"adapter folder not found: {folder / 'missing'}")
    r = subprocess.run(cmd + ["--top-p", "1.5"], input=b"hi\n", capture_output=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "top_p must be in (0, 1]" in r.stderr.decode()


def test_import_hf_cli_then_chat_from_the_imported_checkpoint(exported, tmp_path):
    folder = exported[2]
    r = subprocess.run([sys.executable, "-m", "microlm.cli", "import-hf", str(folder), "--out", str(tmp_path / "imp")],
                       capture_output=True, cwd=REPO, timeout=120, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "imp" / "ckpt" / "model.safetensors").is_file()
    assert (tmp_path / "imp" / "tokenizer" / "microlm_tokenizer.json").is_file()
    r = subprocess.run([sys.executable, "-m", "microlm.cli", "chat", "--model", str(tmp_path / "imp"),
                        "--temperature", "0", "--max-new-tokens", "6", "--json"], input="你好\n",
                       capture_output=True, cwd=REPO, timeout=120, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["user"] == "你好"
    r = subprocess.run([sys.executable, "-m", "microlm.cli", "import-hf", str(tmp_path / "nothing"), "--out",
                        str(tmp_path / "x")], capture_output=True, cwd=REPO, timeout=120, text=True)
    assert r.returncode == 2 and "not a Hugging Face model folder" in r.stderr


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["sigint-default", "sigint-ignored"])
def test_ctrl_c_while_streaming_returns_to_the_prompt(exported, tmp_path, inherited):
    """SIGINT through the pseudo-terminal mid-answer: the answer stops, the loop goes on — also in
    a chat that inherited SIGINT ignored (started under a shell's background job, as a test run
    or CI may be), where Python alone would never raise KeyboardInterrupt."""
    model, tok, _ = exported
    torch.manual_seed(1)
    long_ctx = TransformerLM(dataclasses.replace(model.cfg, max_seq_len=8192)).eval()
    with torch.no_grad():  # a model that never says a stop id: residual dim 0 is a positive constant
        long_ctx.embed.weight[:, 0] = 1.0  # that no layer writes to, and the stop ids' logits are
        for layer in long_ctx.layers:  # -100 × that dimension after the final norm
            layer.attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        for s in ("<|im_end|>", "<|endoftext|>"):
            long_ctx.lm_head.weight[tok.special_ids[s]] = 0.0
            long_ctx.lm_head.weight[tok.special_ids[s], 0] = -100.0
    stops = [tok.special_ids["<|im_end|>"], tok.special_ids["<|endoftext|>"]]
    ids = tok.encode_chat([{"role": "user", "content": "你好"}], add_generation_prompt=True)
    assert len(generate_ids(long_ctx, [ids], max_new_tokens=300, temperature=1.0, top_k=0, top_p=1.0, seed=1,
                            stop_ids=stops)[0]) == 300  # it does not stop by itself before the interrupt
    export_hf(long_ctx, tok, tmp_path / "long")
    pexpect, child = spawn_chat(tmp_path / "long", "--max-new-tokens", "8000", "--temperature", "1.0", "--top-k", "0",
                                "--top-p", "1.0", "--seed", "1", sigint=inherited)
    child.expect("user> ")
    child.sendline("你好")
    child.expect("assistant> ")
    child.expect(r"\S")  # the answer has started streaming: the chat is past input() and in the token loop
    child.sendintr()  # one ^C, never a second (one landing at the prompt would end the chat)
    # the interrupt, or the whole 8,000-token answer with its stats line if the ^C was lost
    assert child.expect([r"\[interrupted", r"\[\d+ tokens, [\d.]+ tokens/s"]) == 0, "Ctrl-C did not stop the answer"
    exit_chat(pexpect, child)
