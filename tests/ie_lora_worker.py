"""Runs one ``ie_lora`` training in its own process (for the torchrun and kill tests):
``python tests/ie_lora_worker.py CONFIG_JSON BASE DATA OUT ENGINE [--resume | --stage]``, where CONFIG_JSON
holds ``--set`` overrides of the smoke profile.  Under ``torchrun`` every rank runs it.  ``--stage``: the
stage's own build (every run of ``ie_lora.runs``, ``base: hf`` = BASE) into OUT, printing its metrics."""

import json
import sys
from pathlib import Path

from microlm.ie.train_lora import train_ie_lora
from microlm.stages import load_config


def main(argv: list[str]) -> None:
    sets, base, data, out, engine = argv[:5]
    cfg = load_config("smoke", json.loads(sets))
    if "--stage" in argv:
        from microlm.stages import StageRun
        from microlm.stages.ie_lora import build

        run = StageRun("ie_lora", cfg, Path(out), {"hf": Path(base), "ie_data": Path(data)}, progress=False,
                       options={"resume": False, "stop_after": None})
        print(json.dumps(build(run)), flush=True)
        return
    train_ie_lora(cfg.ie_lora, {"name": "t", "base": "hf", "engine": engine}, base, Path(data), Path(out), seed=cfg.seed,
                  data_cutoff=cfg.ie_data.cutoff_tokens, progress=False,
                  resume="--resume" in argv)


if __name__ == "__main__":
    main(sys.argv[1:])
