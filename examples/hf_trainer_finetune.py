"""Fine-tune a causal LM with the HF ``Trainer`` and DeepSpeed — agoq comes from the config file.

    deepspeed --num_accelerators 2 examples/hf_trainer_finetune.py --deepspeed ds_configs/hf_zero2_agoq.json
    torchrun --nproc_per_node 2 examples/hf_trainer_finetune.py --deepspeed ds_configs/hf_zero2_agoq.json
    accelerate launch --num_processes 2 examples/hf_trainer_finetune.py --deepspeed ds_configs/hf_zero2_agoq.json

A plain HF script: ``TrainingArguments(deepspeed=...)`` with a config holding an ``"agoq"`` block is
all it takes (``"auto"`` values are filled by the Trainer). The model is a freshly built LLaMA (no
download); ``--init-from DIR`` starts from a saved HF model instead. Data: the embedded corpus or
``--data FILE [FILE ...]``. ``--gradient-checkpointing`` also quantizes the checkpointed inputs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from agoq_ds.testing.data import load_bytes, split
from agoq_ds.testing.models import SHAPES, build_llama
from agoq_ds.testing.shutdown import end_distributed_run


class ByteWindows(Dataset):
    """Consecutive ``seq_len``-byte windows of a token stream, as HF causal-LM examples."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.tokens[i * self.seq_len : (i + 1) * self.seq_len].long()
        return {"input_ids": ids, "labels": ids}


class RecordAgoq(TrainerCallback):
    """Keeps the engine type and the agoq statistics of the run (written with ``--out``)."""

    def __init__(self) -> None:
        self.record: dict = {}

    def on_train_end(self, args, state, control, **kwargs) -> None:
        engine = kwargs["model"]
        trainer_engine = getattr(self, "trainer", None)
        if trainer_engine is not None and getattr(trainer_engine, "deepspeed", None) is not None:
            engine = trainer_engine.deepspeed
        self.record = {
            "engine": type(engine).__name__,
            "zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None,
            "gradient_host": type(engine.agoq_gradient_path()).__name__
            if hasattr(engine, "agoq_gradient_path")
            else None,
            "agoq_stats": engine.agoq_stats() if hasattr(engine, "agoq_stats") else {},
            "compiled": bool(getattr(engine, "is_compiled", False)),
            "losses": [h["loss"] for h in state.log_history if "loss" in h],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed", required=True, help="ds_config.json (with or without an agoq block)")
    parser.add_argument("--model", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--init-from", help="directory of a saved HF causal LM to fine-tune instead")
    parser.add_argument("--data", nargs="*")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--torch-compile", action="store_true", help="TrainingArguments(torch_compile=True)")
    parser.add_argument("--output-dir", default="runs/hf_trainer")
    parser.add_argument("--out", type=Path, help="write engine type, agoq stats and losses as JSON (rank 0)")
    parser.add_argument("--config-as-dict", action="store_true", help="pass the config to HF as a dict, not a path")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()

    train_tokens, _ = split(load_bytes(args.data))
    model = AutoModelForCausalLM.from_pretrained(args.init_from) if args.init_from else build_llama(args.model)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        deepspeed=json.loads(Path(args.deepspeed).read_text()) if args.config_as_dict else args.deepspeed,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=1e-3,
        warmup_steps=3,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=args.gradient_checkpointing,
        torch_compile=args.torch_compile,
        optim="adamw_torch",
        seed=1234,
    )
    recorder = RecordAgoq()
    trainer = Trainer(
        model=model, args=training_args, train_dataset=ByteWindows(train_tokens, args.seq_len), callbacks=[recorder]
    )
    recorder.trainer = trainer
    trainer.train()
    if args.out and int(os.environ.get("RANK", "0")) == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(recorder.record, indent=1))
    end_distributed_run(trainer.deepspeed)


if __name__ == "__main__":
    main()
