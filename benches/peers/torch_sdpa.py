#!/usr/bin/env python3
"""The peer of `tessera bench --backend cuda attention`: PyTorch's
`torch.nn.functional.scaled_dot_product_attention` with the flash backend forced
(`torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)`), f16, on GPU 0.

    torch_sdpa.py --request JSON      (or the request on stdin when --request is absent)
    torch_sdpa.py --dry-run ...       validate the request and echo it, without torch

The request is one JSON object: {"quick": bool, "cases": [CASE, ...]}, each CASE
{"name": str, "batch": int, "seq": int, "heads": int, "head_dim": int, "causal": bool,
"copies": int}: self-attention of `batch` sequences of `seq` tokens (as many queries as keys),
`heads` heads of `head_dim`, Q/K/V as contiguous f16 [batch, heads, seq, head_dim] tensors
(values uniform in [-1, 1)), scale 1/sqrt(head_dim), `is_causal` for the causal mask; the
output is f16 (Tessera's kernel writes f32). Inputs rotate among `copies` sets so that, as on
Tessera's side, the L2 does not hold them between calls.

Timing is Tessera's `time_gpu`: 3 warm-up calls, one call timed to size the batches (about
20 ms each, 2 ms with quick), then 7 batches (3 with quick) between CUDA events; the median
seconds per call is reported.

Output, one JSON line each, in this order:
    {"torch": VERSION, "device": NAME, "backend": "flash"}      once torch and CUDA are up
    {"name": ..., "seconds": S, "reps": N, "tflops": T}          one per case that ran
    {"name": ..., "error": "..."}                                one per case that failed
    {"error": "..."}                                             nothing can run (no torch, no
                                                                 CUDA, a bad request): exit 2
With --dry-run the case lines hold "flops" (the unmasked work) instead of a time.
"""

import argparse
import json
import math
import sys

KEYS = ("name", "batch", "seq", "heads", "head_dim", "causal", "copies")


class PeerError(Exception):
    pass


def emit(obj):
    print(json.dumps(obj), flush=True)


def flops(case):
    """4 * (attended query-key pairs) * head_dim * heads * batch; causal: seq*(seq+1)/2 pairs."""
    s = case["seq"]
    pairs = s * (s + 1) // 2 if case["causal"] else s * s
    return 4.0 * pairs * case["head_dim"] * case["heads"] * case["batch"]


def parse_request(text):
    try:
        req = json.loads(text)
    except ValueError as e:
        raise PeerError(f"the request is not JSON: {e}")
    if not isinstance(req, dict) or not isinstance(req.get("cases"), list):
        raise PeerError('the request must be an object with a "cases" list')
    cases = []
    for i, c in enumerate(req["cases"]):
        if not isinstance(c, dict):
            raise PeerError(f"case {i} is not an object")
        missing = [k for k in KEYS if k not in c]
        if missing:
            raise PeerError(f"case {i} lacks {', '.join(missing)}")
        case = {"name": str(c["name"]), "causal": bool(c["causal"])}
        for k in ("batch", "seq", "heads", "head_dim", "copies"):
            v = c[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PeerError(f"case {i}: {k} must be a positive integer, got {v!r}")
            case[k] = v
        case["copies"] = min(case["copies"], 64)
        cases.append(case)
    return bool(req.get("quick", False)), cases


def time_cuda(torch, fn, quick):
    """Median seconds per call of fn(i) and the calls timed (Tessera's time_gpu)."""
    for i in range(3):
        fn(i)
    a = torch.cuda.Event(enable_timing=True)
    b = torch.cuda.Event(enable_timing=True)
    a.record()
    fn(3)
    b.record()
    b.synchronize()
    one = max(a.elapsed_time(b) * 1e-3, 1e-7)
    target = 2e-3 if quick else 20e-3
    per_batch = min(max(math.ceil(target / one), 1), 10_000)
    batches = 3 if quick else 7
    samples = []
    i = 4
    for _ in range(batches):
        a.record()
        for _ in range(per_batch):
            fn(i)
            i += 1
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) * 1e-3 / per_batch)
    samples.sort()
    return samples[len(samples) // 2], batches * per_batch


def run_case(torch, case, quick):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = (case["batch"], case["heads"], case["seq"], case["head_dim"])
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)

    def rand():
        x = torch.rand(shape, device="cuda", dtype=torch.float32, generator=gen)
        return (x * 2 - 1).to(torch.float16).contiguous()

    first = (rand(), rand(), rand())
    inputs = [first] + [tuple(t.clone() for t in first) for _ in range(case["copies"] - 1)]
    causal = case["causal"]
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):

            def call(i):
                q, k, v = inputs[i % len(inputs)]
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            # A shape the flash backend refuses fails here, before anything is timed.
            call(0)
            torch.cuda.synchronize()
            seconds, reps = time_cuda(torch, call, quick)
    finally:
        del inputs, first
        torch.cuda.empty_cache()
    return {
        "name": case["name"],
        "seconds": seconds,
        "reps": reps,
        "tflops": flops(case) / seconds / 1e12,
    }


def main():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--request", help="the request JSON (read from stdin when absent)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the request and print each case with its flops, without torch",
    )
    args = p.parse_args()
    text = args.request if args.request is not None else sys.stdin.read()
    try:
        quick, cases = parse_request(text)
    except PeerError as e:
        emit({"error": str(e)})
        return 2
    if args.dry_run:
        for c in cases:
            emit({"name": c["name"], "flops": flops(c), "copies": c["copies"], "quick": quick})
        return 0
    try:
        import torch
    except Exception as e:  # ImportError, or a broken install
        emit({"error": f"torch is not importable ({type(e).__name__}: {e})"})
        return 2
    if not torch.cuda.is_available():
        emit({"error": f"torch {torch.__version__} sees no CUDA device"})
        return 2
    emit({"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "backend": "flash"})
    for c in cases:
        try:
            emit(run_case(torch, c, quick))
        except Exception as e:
            msg = " ".join(f"{type(e).__name__}: {e}".split())
            emit({"name": c["name"], "error": msg[:400]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
