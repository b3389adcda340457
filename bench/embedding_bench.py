"""What the embedder costs: latency, memory and load time of all-MiniLM-L6-v2, in numpy
(`app.memory.minilm`, the app's) and, with `--runtime onnxruntime`, in onnxruntime, in one run.

Every measured embedder is a fresh worker process (this script with `--worker`), started one
after the other so that no two loads share the cores; each reports its VmRSS when it starts
(the interpreter and this script, before numpy or onnxruntime is imported), once the model is
loaded, and after 100 single-sentence embeddings, with VmHWM (/proc/self/status), and its load
time (imports and model, to the first call) and first call. The workers:

- `numpy`, OpenBLAS's default threads (one per core) and `OPENBLAS_NUM_THREADS=1` (what
  `python -m app` sets unless the environment says otherwise);
- with `--runtime onnxruntime`, also `onnxruntime` (CPUExecutionProvider) with
  `intra_op_num_threads` 1 and 2. Its model is an ONNX graph of the same safetensors weights
  (BERT's embeddings, 6 layers, mean pooling over the real tokens, L2 normalisation), built
  here with `onnx.helper`: no torch, no download. Its tokens come from the app's WordPiece.
  onnx and onnxruntime are not the project's dependencies: they are installed into a venv of
  their own (`--venv`, created when missing, with numpy and safetensors at the project's
  versions; pip uses the machine's own configuration) and the ONNX workers run there. Their
  vectors must equal numpy's (max abs difference < 1e-4, one sentence and batches of 8,
  padding included) before anything is timed.

Then `embed_many` is timed for one sentence and for a batch of 8 (memory facts of 8 to 20
words, taken in turn): `--warmup` calls each, then `--iterations`, in rounds of `--round`
calls per worker and size, the workers' order rotated every round, so that the machine's
drift falls on every worker alike and their ratios mean something. Wall time (p50, p95) and
the process's CPU time (every thread, mean) per call; and the installed size of each runtime.

Exit status: 0; 1 when the ONNX vectors differ from numpy's; 2 when the benchmark could not
run; 130 when interrupted. Run:
`.venv/bin/python bench/embedding_bench.py --runtime onnxruntime [--iterations 200 --json PATH]`
(2 to 4 minutes, the longer on a busy machine, plus the venv's installation the first time).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import re
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import IO, Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support import MIB, ROOT, BenchError, log, machine, percentile, run_benchmark

# Facts as the memory extractor writes them, 8 to 20 words each.
SENTENCES = (
    "The user's dog is called Max and he is a three year old beagle.",
    "She works as a nurse at the children's hospital on night shifts.",
    "He is allergic to peanuts and carries an epinephrine pen everywhere.",
    "The user prefers to be called Sam rather than Samuel.",
    "Her daughter Emma starts primary school in September next year.",
    "He is training for the Berlin marathon and runs five mornings a week.",
    "The user moved from Lisbon to Manchester last spring for a new job.",
    "She is learning Japanese because she plans a long trip to Kyoto in April.",
    "He does not drink coffee after noon because it keeps him awake at night.",
    "The user's favourite film is Spirited Away, which they have watched a dozen times.",
    "Her mother's birthday is on the fourteenth of March and she loves orchids.",
    "He plays bass guitar in a jazz band that rehearses on Thursday evenings.",
    "The user is vegetarian but still eats fish once or twice a month.",
    "She would like reminders to stretch because her back hurts after long calls.",
    "He is saving money to buy a small flat near the river within two years.",
    "The user has two cats, Pepper and Miso, who do not get along with each other.",
)
BATCH = 8
LOAD_EMBEDDINGS = 100  # single sentences before the third RSS reading
MAX_DIFFERENCE = 1e-4
REPLY_TIMEOUT_S = 600.0
DEFAULT_VENV = Path("/tmp/embedding-bench-venv")
ONNX_PACKAGES = ("onnx", "onnxruntime")
OPSET = 17  # LayerNormalization's first; ReduceSum takes its axes as an input
IR_VERSION = 8  # opset 17's own, which every onnxruntime of these years reads


# --- In every worker: the embedder, its memory and its timings ----------------------------


def memory_kib() -> dict[str, int]:
    """This process's VmRSS and VmHWM (its peak), in KiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


class OnnxEmbedder:
    """The ONNX graph of `build_onnx` with the app's tokenizer: `embed_many` as `MiniLM`'s."""

    def __init__(self, model: Path, model_dir: Path, threads: int) -> None:
        # onnxruntime exists only in the bench's own venv, not in the project's (nor its stubs).
        onnxruntime: Any = importlib.import_module("onnxruntime")
        from app.memory.wordpiece import WordPiece

        max_length = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
        self.tokenizer = WordPiece(model_dir / "vocab.txt", max_length)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    def embed_many(self, texts: Sequence[str]) -> list[list[float]]:
        tokens, mask = self.tokenizer.batch(texts)
        (vectors,) = self.session.run(None, {"input_ids": tokens, "attention_mask": mask})
        return [[float(value) for value in row] for row in vectors]


class Embedder(Protocol):
    def embed_many(self, texts: Sequence[str]) -> list[list[float]]: ...


def texts_for(batch: int, index: int) -> list[str]:
    return [SENTENCES[(index + offset) % len(SENTENCES)] for offset in range(batch)]


def worker(args: argparse.Namespace) -> int:
    """One embedder, driven by JSON lines on stdin; one JSON line back for each, on stdout."""
    before = memory_kib()
    started = time.perf_counter()
    embedder: Embedder
    if args.worker == "numpy":
        from app.memory import minilm

        embedder = minilm.MiniLM(args.model_dir)
    else:
        embedder = OnnxEmbedder(args.onnx_model, args.model_dir, args.threads)
    load_s = time.perf_counter() - started
    loaded = memory_kib()
    started = time.perf_counter()
    embedder.embed_many(SENTENCES[:1])
    first_call_s = time.perf_counter() - started
    for index in range(LOAD_EMBEDDINGS):
        embedder.embed_many(texts_for(1, index))
    reply(
        {
            "before": before,
            "loaded": loaded,
            "after_100": memory_kib(),
            "load_s": load_s,
            "first_call_s": first_call_s,
        }
    )
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "vectors":
            single = [embedder.embed_many([text])[0] for text in SENTENCES]
            batched = [
                vector
                for index in range(0, len(SENTENCES), BATCH)
                for vector in embedder.embed_many(SENTENCES[index : index + BATCH])
            ]
            reply({"single": single, "batched": batched})
        elif request["op"] == "time":
            walls: list[float] = []
            cpus: list[float] = []
            for index in range(request["start"], request["start"] + request["iterations"]):
                texts = texts_for(request["batch"], index)
                wall, cpu = time.perf_counter(), time.process_time()
                embedder.embed_many(texts)
                cpus.append(time.process_time() - cpu)
                walls.append(time.perf_counter() - wall)
            reply({"wall": walls, "cpu": cpus})
        else:
            reply({"end": memory_kib()})
            return 0
    return 0


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


# --- In the bench's venv: the ONNX graph, and the installed sizes --------------------------


def build_onnx(model_dir: Path, out: Path) -> None:
    """all-MiniLM-L6-v2 as `app.memory.minilm` computes it, as an ONNX graph of the same
    weights: the sentence vector of `input_ids` with `attention_mask` (1.0 for real tokens)."""
    import numpy as np
    from safetensors.numpy import load_file

    onnx: Any = importlib.import_module("onnx")  # the bench venv's, as onnxruntime
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    config = json.loads((model_dir / "config.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))
    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    width = hidden // heads
    nodes: list[Any] = []
    initializers: list[Any] = []

    def constant(value: Any, dtype: Any = np.float32) -> str:
        name = f"constant_{len(initializers)}"
        initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(name: str, transpose: bool = False) -> str:
        # As torch's Linear keeps it, (out, in): transposed once, for MatMul.
        array = np.ascontiguousarray(weights[name].T) if transpose else weights[name]
        initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(kind: str, *inputs: str, **attributes: Any) -> str:
        name = f"{kind.lower()}_{len(nodes)}"
        nodes.append(helper.make_node(kind, list(inputs), [name], **attributes))
        return name

    def dense(values: str, prefix: str) -> str:
        return op("Add", op("MatMul", values, weight(f"{prefix}.weight", transpose=True)), weight(f"{prefix}.bias"))

    def norm(values: str, prefix: str) -> str:
        return op(
            "LayerNormalization",
            values,
            weight(f"{prefix}.weight"),
            weight(f"{prefix}.bias"),
            axis=-1,
            epsilon=float(config["layer_norm_eps"]),
        )

    def split_heads(values: str, perm: list[int]) -> str:
        return op("Transpose", op("Reshape", values, constant([0, 0, heads, width], np.int64)), perm=perm)

    length = op("Slice", op("Shape", "input_ids"), constant([1], np.int64), constant([2], np.int64))
    positions = op(
        "Slice",
        weight("embeddings.position_embeddings.weight"),
        constant([0], np.int64),
        length,
        constant([0], np.int64),
    )
    words = op("Gather", weight("embeddings.word_embeddings.weight"), "input_ids", axis=0)
    token_type = constant(weights["embeddings.token_type_embeddings.weight"][0])
    state = norm(op("Add", op("Add", words, positions), token_type), "embeddings.LayerNorm")
    # Padding gets no attention: a large negative score before the softmax, as in minilm.
    masked = op("Mul", op("Sub", constant(1.0), "attention_mask"), constant(-1e9))
    masked = op("Unsqueeze", masked, constant([1, 2], np.int64))
    scale = constant(1 / math.sqrt(width))
    for index in range(int(config["num_hidden_layers"])):
        prefix = f"encoder.layer.{index}"
        query = split_heads(dense(state, f"{prefix}.attention.self.query"), [0, 2, 1, 3])
        key = split_heads(dense(state, f"{prefix}.attention.self.key"), [0, 2, 3, 1])
        value = split_heads(dense(state, f"{prefix}.attention.self.value"), [0, 2, 1, 3])
        scores = op("Add", op("Mul", op("MatMul", query, key), scale), masked)
        context = op("MatMul", op("Softmax", scores, axis=-1), value)
        context = op("Reshape", op("Transpose", context, perm=[0, 2, 1, 3]), constant([0, 0, hidden], np.int64))
        state = norm(
            op("Add", state, dense(context, f"{prefix}.attention.output.dense")), f"{prefix}.attention.output.LayerNorm"
        )
        inner = dense(state, f"{prefix}.intermediate.dense")
        # BERT's exact GELU, x * (1 + erf(x / sqrt 2)) / 2.
        erf = op("Erf", op("Mul", inner, constant(1 / math.sqrt(2))))
        gelu = op("Mul", op("Mul", inner, constant(0.5)), op("Add", erf, constant(1.0)))
        state = norm(op("Add", state, dense(gelu, f"{prefix}.output.dense")), f"{prefix}.output.LayerNorm")
    summed = op(
        "ReduceSum",
        op("Mul", state, op("Unsqueeze", "attention_mask", constant([2], np.int64))),
        constant([1], np.int64),
        keepdims=0,
    )
    pooled = op("Div", summed, op("ReduceSum", "attention_mask", constant([1], np.int64), keepdims=1))
    norms = op("Max", op("ReduceL2", pooled, axes=[1], keepdims=1), constant(1e-12))
    nodes.append(helper.make_node("Div", [pooled, norms], ["embedding"]))
    graph = helper.make_graph(
        nodes,
        "all-MiniLM-L6-v2",
        [
            helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "length"]),
            helper.make_tensor_value_info("attention_mask", onnx.TensorProto.FLOAT, ["batch", "length"]),
        ],
        [helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, ["batch", hidden])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def installed_sizes(names: Sequence[str]) -> dict[str, int]:
    """Bytes on disk of each distribution among `names` and everything they require, in
    this interpreter (optional extras left out)."""
    sizes: dict[str, int] = {}
    pending = list(names)
    while pending:
        name = re.sub(r"[-_.]+", "-", pending.pop()).lower()
        if name in sizes:
            continue
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        paths = [Path(file.locate()) for file in distribution.files or ()]
        sizes[name] = sum(path.stat().st_size for path in paths if path.is_file())
        for requirement in distribution.requires or ():
            if "extra ==" not in requirement:
                pending.append(re.split(r"[^A-Za-z0-9._-]", requirement.strip(), maxsplit=1)[0])
    return sizes


# --- The bench itself ---------------------------------------------------------------------


@dataclass
class Worker:
    """One embedder's worker process; `ask` sends a request and waits for its reply."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[str] | None = None
    started: dict[str, Any] = field(default_factory=dict)
    wall: dict[int, list[float]] = field(default_factory=lambda: {1: [], BATCH: []})
    cpu: dict[int, list[float]] = field(default_factory=lambda: {1: [], BATCH: []})
    # Each round's median wall time: a worker's ratio to another's, round by round.
    round_medians: dict[int, list[float]] = field(default_factory=lambda: {1: [], BATCH: []})

    def start(self) -> None:
        with self.log_path.open("w") as log_file:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                start_new_session=True,
            )
        self.started = self.answer()

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        stdin = self.pipe(self.proc.stdin if self.proc else None)
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        return self.answer()

    def answer(self) -> dict[str, Any]:
        stdout = self.pipe(self.proc.stdout if self.proc else None)
        ready, _, _ = select.select([stdout], [], [], REPLY_TIMEOUT_S)
        line = stdout.readline() if ready else ""
        if not line:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
            raise BenchError(f"worker {self.name} did not answer within {REPLY_TIMEOUT_S:.0f} s:\n{tail}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def pipe(self, stream: IO[str] | None) -> IO[str]:
        if stream is None:
            raise BenchError(f"worker {self.name} is not running")
        return stream

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def ensure_venv(venv: Path) -> Path:
    """The venv's python, with onnx, onnxruntime, numpy and safetensors (the project's versions)."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import numpy, safetensors, onnx, onnxruntime"]
    if python.exists() and subprocess.run(check, capture_output=True, timeout=120).returncode == 0:
        return python
    pins = [f"numpy=={metadata.version('numpy')}", f"safetensors=={metadata.version('safetensors')}"]
    install = [str(python), "-m", "pip", "install", "--quiet", *pins, *ONNX_PACKAGES]
    log(f"installing onnx and onnxruntime into {venv}: {' '.join(install)}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    done = subprocess.run(install, timeout=1200)
    if done.returncode != 0:
        raise BenchError(f"pip could not install the ONNX runtime; run it yourself: {' '.join(install)}")
    return python


def own_env(threads: str | None) -> dict[str, str]:
    """This environment without the caller's thread settings (BLAS's default is one per
    core), and `OPENBLAS_NUM_THREADS` when given."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    env = {key: value for key, value in os.environ.items() if key not in names}
    if threads is not None:
        env["OPENBLAS_NUM_THREADS"] = threads
    return env


def max_difference(first: list[list[float]], second: list[list[float]]) -> float:
    return max(
        abs(a - b) for row_a, row_b in zip(first, second, strict=True) for a, b in zip(row_a, row_b, strict=True)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--runtime",
        choices=("numpy", "onnxruntime"),
        default="numpy",
        help="numpy: the app's encoder only; onnxruntime: onnxruntime as well, interleaved with it",
    )
    parser.add_argument("--iterations", type=int, default=200, help="timed calls per worker and size (200)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls per worker and size first (10)")
    parser.add_argument("--round", type=int, default=20, help="calls per worker and size in a round (20)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"the ONNX runtime's venv ({DEFAULT_VENV})")
    parser.add_argument("--json", type=Path, help="write the results there too")
    # The script's other roles, in its worker processes.
    parser.add_argument("--worker", choices=("numpy", "onnxruntime"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--onnx-model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--build-onnx", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.build_onnx:
        build_onnx(args.model_dir, args.build_onnx)
        return 0
    if args.sizes:
        print(json.dumps(installed_sizes(args.sizes)))
        return 0
    return run_benchmark(
        "embedding_bench",
        lambda tmp, cleanup: run(args, tmp, cleanup),
        json_path=args.json,
        errors=(subprocess.CalledProcessError,),
    )


def run(args: argparse.Namespace, tmp: Path, cleanup: contextlib.ExitStack) -> tuple[dict[str, Any], int]:
    from app.memory import minilm

    model_dir = Path(str(resources.files(minilm.PACKAGE) / "model"))
    script = str(Path(__file__).resolve())
    worker_argv = ["--worker", "numpy", "--model-dir", str(model_dir)]
    workers = [
        Worker(
            "numpy, OpenBLAS default", [sys.executable, script, *worker_argv], own_env(None), tmp / "numpy-default.log"
        ),
        Worker(
            "numpy, OPENBLAS_NUM_THREADS=1", [sys.executable, script, *worker_argv], own_env("1"), tmp / "numpy-1.log"
        ),
    ]
    report: dict[str, Any] = {"machine": machine(), "versions": {"numpy": metadata.version("numpy")}}
    report["sizes"] = {"numpy runtime": installed_sizes(["safetensors"])}
    if args.runtime == "onnxruntime":
        python = ensure_venv(args.venv)
        onnx_model = tmp / "all-MiniLM-L6-v2.onnx"
        started = time.perf_counter()
        subprocess.run(
            [str(python), script, "--build-onnx", str(onnx_model), "--model-dir", str(model_dir)],
            check=True,
            timeout=600,
        )
        report["onnx_build_s"] = time.perf_counter() - started
        report["onnx_model_bytes"] = onnx_model.stat().st_size
        sizes = subprocess.run(
            [str(python), script, "--sizes", "onnxruntime"], check=True, capture_output=True, text=True, timeout=120
        )
        build_sizes = subprocess.run(
            [str(python), script, "--sizes", "onnx"], check=True, capture_output=True, text=True, timeout=120
        )
        report["sizes"]["onnxruntime"] = json.loads(sizes.stdout)
        report["sizes"]["onnx (to build the graph)"] = json.loads(build_sizes.stdout)
        versions = subprocess.run(
            [str(python), "-c", "import onnx, onnxruntime; print(onnx.__version__, onnxruntime.__version__)"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout.split()
        report["versions"].update({"onnx": versions[0], "onnxruntime": versions[1]})
        onnx_argv = ["--worker", "onnxruntime", "--model-dir", str(model_dir), "--onnx-model", str(onnx_model)]
        for threads in (1, 2):
            workers.append(
                Worker(
                    f"onnxruntime, intra_op {threads}",
                    [str(python), script, *onnx_argv, "--threads", str(threads)],
                    own_env(None),
                    tmp / f"onnxruntime-{threads}.log",
                )
            )
    for worker_ in workers:
        cleanup.callback(worker_.stop)
        worker_.start()
        log(f"{worker_.name}: loaded in {worker_.started['load_s']:.2f} s")
    reference = workers[1].ask({"op": "vectors"})
    differences: dict[str, float] = {}
    for worker_ in workers:
        vectors = reference if worker_ is workers[1] else worker_.ask({"op": "vectors"})
        differences[worker_.name] = max(
            max_difference(vectors[kind], reference[kind]) for kind in ("single", "batched")
        )
        log(f"{worker_.name}: vectors within {differences[worker_.name]:.1e} of numpy's")
    report["max_abs_difference"] = differences
    wrong = [name for name, difference in differences.items() if difference >= MAX_DIFFERENCE]
    if wrong:
        print(
            f"embedding_bench: vectors differ from numpy's by {MAX_DIFFERENCE} or more: {', '.join(wrong)}",
            file=sys.stderr,
        )
        return report, 1
    for worker_ in workers:
        for batch in (1, BATCH):
            worker_.ask({"op": "time", "batch": batch, "start": 0, "iterations": args.warmup})
    rounds = math.ceil(args.iterations / args.round)
    for number in range(rounds):
        count = min(args.round, args.iterations - number * args.round)
        for worker_ in workers[number % len(workers) :] + workers[: number % len(workers)]:
            for batch in (1, BATCH):
                timed = worker_.ask({"op": "time", "batch": batch, "start": number * args.round, "iterations": count})
                worker_.wall[batch].extend(timed["wall"])
                worker_.cpu[batch].extend(timed["cpu"])
                worker_.round_medians[batch].append(statistics.median(timed["wall"]))
        log(f"round {number + 1}/{rounds} done")
    for worker_ in workers:
        worker_.started["end"] = worker_.ask({"op": "exit"})["end"]
    app = workers[1]
    report["workers"] = {
        worker_.name: {
            **worker_.started,
            **{
                f"batch_{batch}": {
                    "p50_ms": 1000 * percentile(worker_.wall[batch], 0.5),
                    "p95_ms": 1000 * percentile(worker_.wall[batch], 0.95),
                    "cpu_ms": 1000 * statistics.fmean(worker_.cpu[batch]),
                    "to_app": statistics.median(
                        mine / app
                        for mine, app in zip(worker_.round_medians[batch], app.round_medians[batch], strict=True)
                    ),
                }
                for batch in (1, BATCH)
            },
        }
        for worker_ in workers
    }
    print_report(report, args)
    return report, 0


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{args.iterations} timed calls per worker and size after {args.warmup} warm-up calls, interleaved")
    print(f"in rounds of {args.round}; {report['machine']}; {report['versions']}\n")
    print("Time / app's: the median over rounds of the round's median wall time over the app's (numpy, one thread).\n")
    print(
        "| embedder | load s | first call ms | 1 sentence p50 / p95 ms | CPU ms | time / app's "
        "| batch of 8 p50 / p95 ms | CPU ms | time / app's |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, figures in report["workers"].items():
        one, eight = figures["batch_1"], figures[f"batch_{BATCH}"]
        print(
            f"| {name} | {figures['load_s']:.2f} | {1000 * figures['first_call_s']:.0f} "
            f"| {one['p50_ms']:.1f} / {one['p95_ms']:.1f} | {one['cpu_ms']:.1f} | {one['to_app']:.2f} "
            f"| {eight['p50_ms']:.1f} / {eight['p95_ms']:.1f} | {eight['cpu_ms']:.1f} | {eight['to_app']:.2f} |"
        )
    print("\n| embedder | RSS at start MiB | loaded | after 100 embeddings | at the end | VmHWM at the end |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, figures in report["workers"].items():
        rss = [figures[point]["VmRSS"] / 1024 for point in ("before", "loaded", "after_100", "end")]
        cells = " | ".join(f"{value:.0f}" for value in rss)
        print(f"| {name} | {cells} | {figures['end']['VmHWM'] / 1024:.0f} |")
    print("\n| installed | MiB | distributions |")
    print("|---|---:|---|")
    for runtime, sizes in report["sizes"].items():
        shown = {name: size for name, size in sizes.items() if name != "numpy"}  # numpy: the app's already
        listed = ", ".join(f"{name} {size / MIB:.1f}" for name, size in sorted(shown.items()))
        print(f"| {runtime} (numpy aside) | {sum(shown.values()) / MIB:.1f} | {listed} |")
    if "onnx_model_bytes" in report:
        print(
            f"\nThe ONNX model file: {report['onnx_model_bytes'] / MIB:.1f} MiB, "
            f"built from the safetensors in {report['onnx_build_s']:.1f} s."
        )
    print(f"Max abs difference from numpy, OPENBLAS_NUM_THREADS=1: {report['max_abs_difference']}")


if __name__ == "__main__":
    sys.exit(main())
