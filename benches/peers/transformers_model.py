#!/usr/bin/env python3
"""The peer of `tessera bench model`: Hugging Face `transformers` (PyTorch; f32 on the CPU by
default, or on a CUDA GPU in f32, f16 or bf16) running the same work as Tessera on the same
checkpoint.

One measurement, printed as one JSON line:

    transformers_model.py MODEL_DIR --task prefill|decode|encode --tokens N [--batch B]
                          [--threads T] [--reps R] [--warmup W] [--ids 1,2,...]
                          [--device cpu|cuda] [--dtype f32|f16|bf16]

or a server that keeps torch imported and the models loaded (what `tessera bench` runs):
`transformers_model.py --serve` prints {"ready": true, ...} once imported, then answers each
request line on stdin, a JSON object with the keys `model_dir`, `task`, `tokens`, `batch`,
`threads`, `reps`, `warmup` and optionally `ids` (a list), `device` (`cpu`, the default, or
`cuda`) and `dtype` (`f32`, the default, `f16` or `bf16`), with one JSON line, until EOF.

On `cuda` the model (loaded in `dtype`) and the inputs live on GPU 0, and every timed call is
bracketed by `torch.cuda.synchronize()`, so it is timed until the GPU has finished it.

Tasks:
* prefill: `GPT2LMHeadModel(input_ids)` over B sequences of N tokens (logits at every
  position, no cache), as Tessera's `Gpt2::forward`;
* decode: greedy `generate` from one prompt of N tokens (B = 1), N new tokens measured
  (`min_new_tokens = max_new_tokens`, so it never stops at EOS), KV cache on: the time of
  `generate(max_new_tokens=N+1)` minus that of `generate(max_new_tokens=1)` (the prefill and
  the first token), i.e. N decode steps; each repetition times both back to back and the
  median of the differences is reported;
* encode: `BertModel(input_ids, attention_mask)` (with its pooler) over B x N tokens.

The ids default to fixed-seed random ones. A result holds "seconds" (median seconds of the
work), "tokens_per_s" (tokens / seconds), "reps", "samples", "torch", "transformers",
"attn_implementation", "device", "dtype" (and on cuda "gpu", the device's name) and, for
decode, "generated" (the N + 1 new ids of the last run); a
failure is {"error": "..."} (exit status 2 in the one-shot form). A checkpoint with missing,
unexpected or mismatched keys is a failure.
"""

import argparse
import json
import os
import statistics
import sys
import time

TASKS = ("prefill", "decode", "encode")
DEVICES = ("cpu", "cuda")
# Request dtype -> the torch dtype's attribute name.
DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


class PeerError(Exception):
    pass


_models = {}


def load(model_dir, task, device="cpu", dtype="f32"):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModel if task == "encode" else AutoModelForCausalLM
    key = (os.path.abspath(model_dir), cls.__name__, device, dtype)
    if key not in _models:
        torch_dtype = getattr(torch, DTYPES[dtype])
        model, info = cls.from_pretrained(model_dir, dtype=torch_dtype, output_loading_info=True)
        bad = {k: v for k, v in info.items() if v}
        if bad:
            raise PeerError(f"{model_dir}: the checkpoint does not match {type(model).__name__}: {bad}")
        model = model.to(device)
        model.eval()
        _models[key] = model
    return _models[key]


def measure(model_dir, task, tokens, batch=1, threads=1, reps=3, warmup=1, ids=None, device="cpu", dtype="f32"):
    import torch
    import transformers

    if task not in TASKS:
        raise PeerError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if device not in DEVICES:
        raise PeerError(f"unknown device {device!r} (known: {', '.join(DEVICES)})")
    if dtype not in DTYPES:
        raise PeerError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if tokens < 1 or batch < 1 or threads < 1 or reps < 1 or warmup < 0:
        raise PeerError("tokens, batch, threads and reps must be positive")
    if task == "decode" and batch != 1:
        raise PeerError("decode runs one sequence (batch 1)")
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise PeerError(f"torch {torch.__version__} sees no CUDA device")
    torch.set_num_threads(threads)
    model = load(model_dir, task, device, dtype)
    cfg = model.config
    n = batch * tokens
    if ids is not None:
        if len(ids) != n:
            raise PeerError(f"{len(ids)} ids given, not batch x tokens = {n}")
        ids = torch.tensor(ids, dtype=torch.long).reshape(batch, tokens)
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (batch, tokens), generator=g)
    ids = ids.to(device)
    mask = torch.ones_like(ids)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(f):
        sync()
        t0 = time.perf_counter()
        out = f()
        sync()
        return time.perf_counter() - t0, out

    extra = {}
    with torch.inference_mode():
        if task in ("prefill", "encode"):
            kwargs = {"use_cache": False} if task == "prefill" else {}

            def call():
                return model(input_ids=ids, attention_mask=mask, **kwargs)

            for _ in range(warmup):
                call()
            samples = [timed(call)[0] for _ in range(reps)]
            work_tokens = n
        else:

            def gen(k):
                return model.generate(
                    ids,
                    attention_mask=mask,
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=k,
                    min_new_tokens=k,
                    use_cache=True,
                    pad_token_id=cfg.eos_token_id,
                )

            for _ in range(warmup):
                gen(2)
            samples = []
            generated = None
            for _ in range(reps):
                t_long, out = timed(lambda: gen(tokens + 1))
                t_short, _ = timed(lambda: gen(1))
                samples.append(t_long - t_short)
                generated = out[0, tokens:].tolist()
            if len(generated) != tokens + 1:
                raise PeerError(f"generate made {len(generated)} tokens, not {tokens + 1}")
            extra["generated"] = generated
            work_tokens = tokens
    if cuda:
        extra["gpu"] = torch.cuda.get_device_name()
    seconds = statistics.median(samples)
    return {
        "seconds": seconds,
        "tokens_per_s": work_tokens / seconds if seconds > 0 else None,
        "reps": reps,
        "samples": samples,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "device": device,
        "dtype": dtype,
        **extra,
    }


def serve():
    import torch
    import transformers

    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    print(json.dumps({"ready": True, "torch": torch.__version__, "transformers": transformers.__version__}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            res = measure(
                req["model_dir"],
                req["task"],
                int(req["tokens"]),
                batch=int(req.get("batch", 1)),
                threads=int(req.get("threads", 1)),
                reps=int(req.get("reps", 3)),
                warmup=int(req.get("warmup", 1)),
                ids=req.get("ids"),
                device=req.get("device", "cpu"),
                dtype=req.get("dtype", "f32"),
            )
        except Exception as e:  # reported to the caller, the server goes on
            res = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(res), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", nargs="?")
    p.add_argument("--serve", action="store_true", help="answer JSON requests on stdin")
    p.add_argument("--task", choices=TASKS)
    p.add_argument("--tokens", type=int, default=128, help="sequence (decode: prompt) length; new tokens for decode")
    p.add_argument("--batch", type=int, default=1, help="sequences (prefill, encode)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--ids", default=None, help="the batch x tokens input ids, comma-separated, row-major")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="where the model runs (cuda: GPU 0)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="f32", help="the type the weights are loaded in")
    a = p.parse_args()
    if a.serve:
        serve()
        return
    if a.model_dir is None or a.task is None:
        p.error("MODEL_DIR and --task are required (or --serve)")
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    ids = [int(t) for t in a.ids.split(",")] if a.ids else None
    try:
        res = measure(
            a.model_dir, a.task, a.tokens, a.batch, a.threads, a.reps, a.warmup, ids, device=a.device, dtype=a.dtype
        )
    except PeerError as e:
        print(json.dumps({"error": str(e)}))
        sys.exit(2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
