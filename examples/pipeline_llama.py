"""Train a LLaMA-architecture model as a 2-stage DeepSpeed ``PipelineModule`` (1F1B schedule).

    deepspeed --num_accelerators 2 examples/pipeline_llama.py --deepspeed_config ds_configs/pipeline_agoq.json

With an ``"agoq"`` block the pipeline engine quantizes each stage's saved activations with
stage-aware bit-widths (early stages hold more micro-batches under 1F1B) and checkpointed inputs
through agoq's checkpoint function. ``--checkpoint`` enables activation checkpointing per layer.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import deepspeed
from deepspeed.pipe import PipelineModule
from tqdm import tqdm

from agoq_ds.testing.data import batches, load_bytes, split
from agoq_ds.testing.models import SHAPES, build_llama, causal_lm_loss, llama_pipeline_layers
from agoq_ds.testing.shutdown import end_distributed_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--data", nargs="*")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--checkpoint", action="store_true", help="activation checkpointing every layer")
    parser.add_argument("--out", type=Path, help="write losses and agoq stats of the last stage as JSON")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = deepspeed.add_config_arguments(parser).parse_args()

    deepspeed.init_distributed()
    train_tokens, _ = split(load_bytes(args.data))
    model = build_llama(args.model, seed=args.seed)
    pipe = PipelineModule(
        layers=llama_pipeline_layers(model),
        num_stages=args.stages,
        loss_fn=causal_lm_loss,
        partition_method="uniform",
        activation_checkpoint_interval=1 if args.checkpoint else 0,
    )
    engine, _, _, _ = deepspeed.initialize(args=args, model=pipe, model_parameters=pipe.parameters())
    # Every stage reads the same stream: the first stage uses the inputs, the last the labels.
    dp_rank, dp_world = engine.grid.get_data_parallel_rank(), engine.grid.get_data_parallel_world_size()
    stream = batches(train_tokens, engine.train_micro_batch_size_per_gpu(), args.seq_len, args.seed, dp_rank, dp_world)
    data = ((b, b) for b in stream)
    losses = []
    last_stage = engine.is_last_stage()
    for _ in tqdm(range(args.steps), disable=not (last_stage and dp_rank == 0), desc="pipeline", unit="step"):
        losses.append(engine.train_batch(data_iter=data).float().item())
    if args.out and last_stage and dp_rank == 0:
        record = {
            "engine": type(engine).__name__,
            "stage": engine.stage_id,
            "losses": losses,
            "agoq_stats": engine.agoq_stats() if hasattr(engine, "agoq_stats") else {},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
    end_distributed_run(engine)


if __name__ == "__main__":
    main()
