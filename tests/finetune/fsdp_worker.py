"""Run under torchrun by test_fsdp.py: the training jobs of a JSON spec, on every rank.

    python -m torch.distributed.run --standalone --nproc-per-node 2 fsdp_worker.py SPEC

SPEC: {"model": folder, "examples": [{ids, targets, line}], "eval": [...],
"examples_other_ranks" (optional: what ranks > 0 read instead), "jobs": [{"out",
"config" (TrainConfig fields), "dtype" (of the base; float32 if absent), "resume", "stop_after" (a step, or null), "states" (a path
prefix: the whole LoRA weights after each step, written by rank 0, or null)}]}.
"""

from __future__ import annotations

import json
import sys

from safetensors.torch import save_file

import mistral7b
from mistral7b.distributed.runtime import leave
from mistral7b.finetune import Example, TrainConfig, Trainer
from mistral7b.finetune.sharding import full_lora_tensors


def _examples(rows: list[dict]) -> list[Example]:
    return [Example(r["ids"], r["targets"], r["line"]) for r in rows]


def run_job(spec: dict, job: dict) -> None:
    llm = mistral7b.load(spec["model"], device="cpu", dtype=job.get("dtype", "float32"))
    config = job["config"]
    config["targets"] = tuple(config.get("targets", ("wq", "wk", "wv", "wo", "w1", "w2", "w3")))
    trainer = Trainer(llm, TrainConfig(**config), job["out"], progress=False)
    assert trainer.ranks.sharded, "the worker runs under torchrun with more than one process"

    def on_step(info):
        if job.get("states"):
            tensors = full_lora_tensors(trainer.model, trainer.ranks)
            if trainer.ranks.is_main:
                save_file(tensors, f"{job['states']}-step{info.step}.safetensors")
        if info.step == job.get("stop_after"):
            raise KeyboardInterrupt  # on every rank at the same step, as a held Ctrl-C is

    try:
        rows = spec["examples"] if trainer.ranks.rank == 0 else \
            spec.get("examples_other_ranks", spec["examples"])
        trainer.fit(_examples(rows), _examples(spec["eval"]) or None,
                    resume=job["resume"], on_step=on_step)
    except KeyboardInterrupt:
        pass


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    for job in spec["jobs"]:
        run_job(spec, job)
    leave()


if __name__ == "__main__":
    main()
