"""Frozen-prefix replay on a PEFT (LoRA) causal LM: one HVP pass over the Hessian batches with the replay and without
it (every pass runs the whole model), measured side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prefix_peft.py [--arch gpt2|llama] [--size small|tiny] [--top 2] [--rounds 5]

Model: GPT-2 or Llama built from config (``small``: 12 layers, 768 wide; ``tiny``: 4 layers, 128 wide; vocabulary
``--vocab``), wrapped with ``peft.get_peft_model`` and LoRA (r=8, dropout 0.05) on the top ``--top`` blocks only (GPT-2:
``c_attn`` and ``c_proj``; Llama: ``q_proj`` and ``v_proj``, whose hidden states ``k_proj`` also reads: the case the
replay fell back on before the fix), fp32, eval mode. Hessian data: ``--batches`` batches of ``--rows`` random-token rows of ``--seq-len`` tokens. Each round times one
pass with the replay (``PrefixReplay.hvp``) and one without (``hvp.dataset_hvp``) in alternating order; medians are
reported with their ratio, and the products are checked to agree. Setting up the replay (finding the prefix, recording
its outputs once, the 2-row check) is reported apart: it is paid once per fit, not per pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from hf_influence.engine.grads import LossFunction, eval_mode  # noqa: E402
from hf_influence.engine.hvp import dataset_hvp  # noqa: E402
from hf_influence.engine.prefix import PrefixReplay  # noqa: E402
from hf_influence.params import select_parameters  # noqa: E402
from hf_influence.tasks import infer_task  # noqa: E402

SIZES = {"small": dict(hidden=768, layers=12, heads=12), "tiny": dict(hidden=128, layers=4, heads=4)}


def base_model(args):
    size = SIZES[args.size]
    if args.arch == "llama":
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=size["hidden"], intermediate_size=int(8 * size["hidden"] / 3),
                             num_hidden_layers=size["layers"], num_attention_heads=size["heads"], max_position_embeddings=max(128, args.seq_len),
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return LlamaForCausalLM(config), {"target_modules": ["q_proj", "v_proj"]}
    config = GPT2Config(vocab_size=args.vocab, n_positions=max(128, args.seq_len), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        n_embd=size["hidden"], n_layer=size["layers"], n_head=size["heads"])
    return GPT2LMHeadModel(config), {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}


def build(args):
    torch.manual_seed(0)
    base, targets = base_model(args)
    layers = list(range(base.config.num_hidden_layers - args.top, base.config.num_hidden_layers))
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.05, layers_to_transform=layers, **targets)
    model = get_peft_model(base, lora).eval()
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(3, args.vocab, (args.rows, args.seq_len), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return model, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--top", type=int, default=2, help="LoRA on this many top blocks")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vectors", type=int, default=1, help="vectors per HVP pass (1: Arnoldi; more: block Krylov)")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=5000)
    args = parser.parse_args()
    model, batches = build(args)
    loss_fn = LossFunction(model, infer_task(model), select_parameters(model))
    params = loss_fn.selection.tensors(model)
    vectors = torch.randn(loss_fn.selection.num_params, args.vectors, generator=torch.Generator().manual_seed(2))
    with eval_mode(model):
        start = time.perf_counter()
        replay = PrefixReplay(loss_fn, params, batches, memory_budget=8 * 2**30)
        setup = time.perf_counter() - start
        assert replay.active, "the replay turned itself off (see the log)"
        sides = {"replay": replay.hvp, "full": lambda v: dataset_hvp(loss_fn, params, batches, v)}
        times, products = {name: [] for name in sides}, {}
        for round_ in range(args.rounds):
            for name in (list(sides) if round_ % 2 == 0 else list(reversed(sides))):
                start = time.perf_counter()
                products[name] = sides[name](vectors)
                times[name].append(time.perf_counter() - start)
    error = float((products["replay"] - products["full"]).norm() / products["full"].norm())
    replay_s, full_s = statistics.median(times["replay"]), statistics.median(times["full"])
    total = sum(p.numel() for p in model.parameters())
    print(f"{args.arch} {args.size} ({total / 1e6:.1f}M parameters), LoRA on the top {args.top} blocks ({loss_fn.selection.num_params:,} "
          f"selected), {args.batches} x {args.rows} rows x {args.seq_len} tokens, {args.vectors} vector(s) per pass, "
          f"{args.rounds} rounds, torch threads {torch.get_num_threads()}")
    print(f"prefix: {len(replay.modules)} modules, {sum(replay.read_later)} kept; set-up {setup:.2f} s (once per fit)")
    print("| pass | median s | ratio to full |")
    print("|---|---|---|")
    print(f"| full model | {full_s:.3f} | 1.00 |")
    print(f"| prefix replay | {replay_s:.3f} | {full_s / replay_s:.2f}x faster |")
    print(f"relative difference of the products: {error:.1e}")


if __name__ == "__main__":
    main()
