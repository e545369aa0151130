"""Reduced precision on this CPU: speed against float32 and what it costs in accuracy (docs/performance.md).

    python -m torchcvt train --output /tmp/digits-run          # the digits demo (1-2 min)
    python benchmarks/reduced_precision.py --digits /tmp/digits-run

Every option is measured whether or not this CPU offers it (``torchcvt.backends`` offers int8 only with
avx512_vnni/avx_vnni/amx_int8 and bfloat16 only with avx512_bf16/amx_bf16, and then only where this
measurement says it is faster):

* speed: CvT-13 (random weights) at batch 1 and 8, each option timed alternately with the float32 run of
  its own backend (ONNX Runtime int8 against ONNX Runtime float32, PyTorch against the eager backend);
* accuracy: top-1 agreement with float32 and the largest logit change, on the digits demo's held-out
  set and on 200 random inputs of that CvT-13; the digits top-1 of each option too.

Options: ``ort-int8-dynamic`` (what ``precision="int8"`` runs: ONNX Runtime's dynamic quantization,
int8 weights, activations quantized per call), ``ort-int8-static`` (QDQ, activations calibrated on 32
inputs of the same distribution), ``torch-int8-dynamic`` (``torch.ao.quantization.quantize_dynamic`` of
the linears, fbgemm), ``bf16-autocast`` (what ``precision="bfloat16"`` runs), ``bf16-weights`` (the
model converted to bfloat16).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings

import torch

from torchcvt import create_model
from torchcvt.backends import AutocastModel, OnnxRuntimeModel, onnxruntime_session, optimize_for_inference
from torchcvt.datasets import build_datasets
from torchcvt.fastpath import remove_fast_path
from torchcvt.fileio import atomic_save
from torchcvt.machine import cpu_info, load_average, median_ratio, onnxruntime_version, time_alternating
from torchcvt.pretrained import load_pretrained

OPTIONS = ("ort-int8-dynamic", "ort-int8-static", "torch-int8-dynamic", "bf16-autocast", "bf16-weights")


def _ort_static(fp32: OnnxRuntimeModel, calibration: torch.Tensor):
    """ONNX Runtime static int8 (QDQ) of the exported float32 file, calibrated on ``calibration``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixel_values": x[None].numpy()} for x in calibration])

        def get_next(self):
            return next(self.batches, None)

    target = fp32.path.with_name(fp32.path.stem + "-int8-static.onnx")
    if not target.is_file():  # written atomically: an interrupted run leaves no half file for the next to use
        atomic_save(lambda tmp: quantize_static(str(fp32.path), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True),
                    target)
    # The sessions of OnnxRuntimeModel (threads = torch's, no spinning), on the quantized file.
    session = onnxruntime_session(target, torch.get_num_threads())
    return lambda x: torch.from_numpy(session.run(["logits"], {"pixel_values": x.contiguous().numpy()})[0])


def build(option: str, model, calibration: torch.Tensor):
    """``(float32 reference runner, option runner)`` for one option."""
    if option.startswith("ort-"):
        fp32 = OnnxRuntimeModel(model)
        if option == "ort-int8-dynamic":
            return fp32, OnnxRuntimeModel(model, precision="int8")
        return fp32, _ort_static(fp32, calibration)
    eager = optimize_for_inference(model, "eager")
    if option == "bf16-autocast":
        return eager, AutocastModel(eager)
    if option == "bf16-weights":
        half = copy.deepcopy(eager).to(torch.bfloat16)
        return eager, lambda x: half(x.to(torch.bfloat16)).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        quantized = torch.ao.quantization.quantize_dynamic(remove_fast_path(copy.deepcopy(model)), {torch.nn.Linear}, dtype=torch.qint8)
    return eager, quantized


@torch.inference_mode()
def logits(runner, x: torch.Tensor, batch: int = 50) -> torch.Tensor:
    return torch.cat([runner(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def accuracy(reference, runner, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
    ref, out = logits(reference, x), logits(runner, x)
    result = {"agree": (ref.argmax(-1) == out.argmax(-1)).float().mean().item(), "max_change": (ref - out).abs().max().item()}
    if labels is not None:
        result["top1_fp32"] = (ref.argmax(-1) == labels).float().mean().item()
        result["top1"] = (out.argmax(-1) == labels).float().mean().item()
    return result


def speed(reference, runner, size: int, rounds: dict[int, int], slow: float = 0.3) -> dict[int, float | None]:
    """Speed-up over ``reference`` at each batch; batches after one measured below ``slow`` are skipped."""
    result: dict[int, float | None] = {}
    for batch, repeats in rounds.items():
        if result and min(v for v in result.values() if v is not None) < slow:
            result[batch] = None
            continue
        x = torch.randn(batch, 3, size, size)
        with torch.inference_mode():
            times = time_alternating({"fp32": lambda: reference(x), "option": lambda: runner(x)}, repeats=repeats)
        result[batch] = median_ratio(times["fp32"], times["option"])
        print(f"  batch {batch}: fp32 {statistics.median(times['fp32']) * 1e3:.0f} ms, option "
              f"{statistics.median(times['option']) * 1e3:.0f} ms", file=sys.stderr, flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--digits", required=True, help="a run folder of `cvt train` on the digits demo")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, from {', '.join(OPTIONS)}")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", default="1:8,8:3", help="timed rounds per batch size (default 1:8,8:3)")
    parser.add_argument("--random-inputs", type=int, default=200,
                        help="random inputs of the CvT-13 for the agreement (default 200; fewer where an option is very slow)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = {int(b): int(r) for b, r in (item.split(":") for item in args.rounds.split(","))}
    start_load = load_average()

    digits_model, pre, _ = load_pretrained(args.digits)
    digits_model.eval()
    splits = build_datasets("digits", image_size=pre.image_size, train_transform=lambda t: t)
    val_x = torch.stack([splits.val[i][0] for i in range(len(splits.val))])
    val_y = torch.tensor([splits.val[i][1] for i in range(len(splits.val))])
    train_x = torch.stack([splits.train[i][0] for i in range(32)])
    torch.manual_seed(0)
    cvt13 = create_model("cvt-13").eval()
    random_x = torch.randn(args.random_inputs, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    calibration = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(2))

    rows = []
    for option in args.options.split(","):
        print(f"{option}:", file=sys.stderr, flush=True)
        reference, runner = build(option, cvt13, calibration)
        ups = speed(reference, runner, 224, rounds)
        on_cvt13 = accuracy(reference, runner, random_x)
        on_digits = accuracy(*build(option, digits_model, train_x), val_x, val_y)
        rows.append((option, ups, on_cvt13, on_digits))
        print(f"  {ups} {on_cvt13} {on_digits}", file=sys.stderr, flush=True)

    cpu = cpu_info()
    print(f"CPU: {cpu.describe()}; torch {torch.__version__}, onnxruntime {onnxruntime_version()}, "
          f"threads {torch.get_num_threads()}, load average at start/end: {start_load} / {load_average()}")
    print(f"digits: {len(val_y)} held-out images at {pre.image_size}px ({args.digits}); CvT-13: random weights, {len(random_x)} random inputs\n")
    batches = list(rounds)
    print("| option | " + " | ".join(f"speed b{b}" for b in batches)
          + " | CvT-13 top-1 agreement | CvT-13 max logit change | digits top-1 agreement | digits max logit change | digits top-1 (fp32) |")
    print("|---" * (len(batches) + 6) + "|")
    for option, ups, a, d in rows:
        cells = [f"{ups[b]:.2f}x" if ups[b] is not None else "not timed (slow)" for b in batches]
        cells += [f"{100 * a['agree']:.1f} %", f"{a['max_change']:.3f}", f"{100 * d['agree']:.2f} %", f"{d['max_change']:.3f}",
                  f"{100 * d['top1']:.2f} % ({100 * d['top1_fp32']:.2f} %)"]
        print(f"| {option} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
