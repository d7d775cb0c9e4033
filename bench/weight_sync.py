"""Weight-update time of the rollout service vs checkpoint size (load by path and upload).

    python bench/weight_sync.py --backend hf --sizes 128x2 256x4 512x8 1024x8 --repeats 3
    python bench/weight_sync.py --backend vllm --enforce-eager --sizes 128x2 512x8 1024x8
    python bench/weight_sync.py --model ./demo/student      # a given checkpoint instead

For each model (a random tiny Llama per `HIDDENxLAYERS`, float32, or `--model` directories),
a real rollout server is started (`python -m services.student_rollout`, the production path)
and timed, from the client, end to end:

- `load`: `POST /v1/weights/load` of a checkpoint directory inside `--weights-dir` (the shared
  disk case: header validation + the engine reading the file and swapping it in);
- `upload`: `PUT /v1/weights?version=N` with the safetensors file as the body, read from
  memory by the client (no shared disk: the transfer, the staging write, validation, load).

Each repeat uses a new version and a differently perturbed checkpoint (an engine cannot skip
work because nothing changed). The server also reports its own `update_seconds`. Output: a
table per (size, method) with the median seconds and MB/s; `--json-out` keeps the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/weight_sync.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))


def build_models(sizes: list[str], root: Path) -> list[Path]:
    """One random tiny Llama per `HIDDENxLAYERS` (shared tokenizer)."""
    from opd.tiny import build_model, build_tokenizer

    build_tokenizer(root / "tokenizer")
    out = []
    for size in sizes:
        hidden, layers = (int(x) for x in size.lower().split("x"))
        out.append(build_model(root / f"llama-{size}", root / "tokenizer", seed=0,
                               hidden_size=hidden, num_layers=layers))
    return out


def write_variant(model_dir: Path, out_dir: Path, seed: int) -> Path:
    """The model's checkpoint with every tensor perturbed (same names, shapes, dtypes)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    perturbed = {k: v + 1e-3 * torch.randn(v.shape, generator=gen).to(v.dtype)
                 for k, v in tensors.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(perturbed, str(out_dir / "model.safetensors"))
    return out_dir / "model.safetensors"


def bench_model(model_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start a server on `model_dir` and time `--repeats` loads and uploads."""
    from tests.servers import start_server

    work = Path(tempfile.mkdtemp(prefix="opd-wsync-"))
    weights = work / "weights"
    weights.mkdir()
    # Prepare every variant before timing (writing them is not what is measured).
    variants = [write_variant(model_dir, weights / f"v{i}", seed=i)
                for i in range(1, 2 * (args.repeats + args.warmup) + 1)]
    size = variants[0].stat().st_size
    flags = ["--model", str(model_dir), "--backend", args.backend, "--dtype", args.dtype,
             "--weights-dir", str(weights), "--max-upload-bytes", str(1 << 40),
             "--no-access-log", "--log-level", "warning"]
    if args.backend == "vllm":
        flags += ["--max-model-len", "512", "--enforce-eager" if args.enforce_eager
                  else "--no-enforce-eager"]
    else:
        flags += ["--device", args.device]
    rows = []
    try:
        with start_server("services.student_rollout", flags,
                          ready_timeout=args.ready_timeout) as srv, \
                httpx.Client(base_url=srv.base_url, timeout=None) as client:
            version = 0
            for method in ("load", "upload"):
                client_s, server_s = [], []
                for i in range(args.warmup + args.repeats):
                    version += 1
                    path = variants[version - 1]
                    if method == "load":
                        start = time.perf_counter()
                        r = client.post("/v1/weights/load",
                                        json={"path": path.parent.name, "version": version})
                    else:
                        body = path.read_bytes()
                        start = time.perf_counter()
                        r = client.put(f"/v1/weights?version={version}", content=body,
                                       headers={"Content-Type": "application/octet-stream"})
                    elapsed = time.perf_counter() - start
                    r.raise_for_status()
                    if i >= args.warmup:
                        client_s.append(elapsed)
                        server_s.append(r.json()["update_seconds"])
                rows.append({
                    "model": str(model_dir), "backend": args.backend, "method": method,
                    "bytes": size, "client_s": client_s, "server_s": server_s,
                    "median_s": statistics.median(client_s),
                    "mb_per_s": size / 1e6 / statistics.median(client_s),
                })
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one line per (model, method)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu", help="hf backend device")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--sizes", nargs="*", default=["128x2", "256x4", "512x8", "1024x8"],
                        help="random tiny Llamas to build: HIDDENxLAYERS")
    parser.add_argument("--model", nargs="*", default=[],
                        help="checkpoint directories to use (in addition to --sizes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="opd-wsync-models-"))
    rows: list[dict[str, Any]] = []
    try:
        models = build_models(args.sizes, root) + [Path(m) for m in args.model]
        for model in models:
            rows += bench_model(model, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nbackend={args.backend} dtype={args.dtype} repeats={args.repeats}")
    print(f"{'model':<34}{'method':<8}{'MB':>9}{'median s':>10}{'server s':>10}{'MB/s':>9}")
    for row in rows:
        print(f"{Path(row['model']).name[:33]:<34}{row['method']:<8}{row['bytes'] / 1e6:>9.1f}"
              f"{row['median_s']:>10.3f}{statistics.median(row['server_s']):>10.3f}"
              f"{row['mb_per_s']:>9.0f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
