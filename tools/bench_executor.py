"""Ray executor vs local, and the device agent vs local bench.

1. An evaluation-bound PAC-BO search (digits MLP 64-256-256-10, SVD ranks,
   fixed gamma) where every evaluation also waits ``--delay`` seconds, as it
   would for a device's timing: in process (``LocalExecutor``) vs two Ray
   workers (``RayExecutor``), both proposing 2 points per GP fit. Reports the
   wall time of each search (``ray.init`` counted apart; starting the workers
   and building their objectives counted in) and whether the
   evaluations and the answer are identical.
2. ``bench`` of EfficientNet-Lite0 here vs through an agent on loopback (same
   options, interleaved, the faster of ``--repeats`` passes each): the wall
   time of the whole call and the p50; and what the agent itself adds: the
   host's wall time of one run request minus the agent's time on it
   (framing, hashing, .npy, loopback), and sending the model (once per agent).

    python tools/bench_executor.py [--delay 1.0] [--max-evals 24] [--iters 100] [--skip-ray] [--skip-agent]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


class SlowedObjective:
    """An objective that also waits ``seconds`` per evaluation (a device's timing, say)."""

    def __init__(self, objective, seconds: float):
        self.objective, self.seconds = objective, seconds

    @property
    def gamma(self) -> float:
        return self.objective.gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        self.objective.gamma = value

    def __call__(self, theta, index):
        time.sleep(self.seconds)
        return self.objective(theta, index)


class SlowedRecipe:
    """An ``ObjectiveRecipe`` whose objective is slowed on the Ray workers too."""

    def __init__(self, recipe, seconds: float):
        self.recipe, self.seconds, self.key = recipe, seconds, recipe.key + "-slowed"

    def build(self):
        return SlowedObjective(self.recipe.build(), self.seconds)


def search_bench(args) -> None:
    import onnx_ir as ir
    import torch
    import zoo
    from conftest import export

    from pycompress.decisions.bo import PACBO, LocalExecutor, PACBOSettings
    from pycompress.executor import ObjectiveRecipe, RayExecutor
    from pycompress.ir import load_model

    (x_train, y_train), _ = zoo.digits()
    torch.set_num_threads(1)
    module = zoo.train(zoo.MLP((64, 256, 256, 10)), x_train, y_train, epochs=5)
    folder = Path(tempfile.mkdtemp(prefix="bench_executor_"))
    model = load_model(export(module, (1, 64), folder / "mlp.onnx"))
    recipe = ObjectiveRecipe(ir.to_proto(model).SerializeToString(), {model.graph.inputs[0].name: x_train.astype(np.float32)}, None,
                             {"loss": "norm", "samples": 50, "outputs": None, "seed": 0, "threads": 1},
                             {"actions": ["svd"]}, "size", {"skip_rank_beyond_r_max": True})
    objective = recipe.build()
    objective.gamma = 2.0
    settings = PACBOSettings(initial=6, max_evals=args.max_evals, seed=0, batch_size=2, epsilon=1e-9)

    def run(executor, slowed):
        t0 = time.perf_counter()
        result = PACBO(objective.space.d, slowed, settings, snap=objective.space.snap, executor=executor).run()
        return result, time.perf_counter() - t0

    local, local_s = run(LocalExecutor(), SlowedObjective(objective, args.delay))
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    init_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()     # workers start and build their objective: counted in the search's time
        executor = RayExecutor(SlowedRecipe(recipe, args.delay), workers=2)
        remote, _ = run(executor, SlowedObjective(objective, args.delay))
        remote_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    same = ([o.theta for o in local.observations] == [o.theta for o in remote.observations]
            and [o.value for o in local.observations] == [o.value for o in remote.observations]
            and list(local.theta) == list(remote.theta))
    print(f"search: {len(local.observations)} evaluations, {args.delay:g} s wait each, 2 points per GP fit")
    print(f"  local executor        {local_s:7.2f} s")
    print(f"  Ray, 2 workers        {remote_s:7.2f} s   (+ {init_s:.2f} s ray.init)   speed-up "
          f"{local_s / remote_s:.2f}x ({local_s / (remote_s + init_s):.2f}x with init)")
    print(f"  same evaluations and answer: {same}")


def agent_bench(args) -> None:
    from agent_helpers import TOKEN, running_agent

    from pycompress.agent.client import DeviceClient
    from pycompress.bench import bench_models
    from pycompress.bench.remote import bench_models_on_device
    from pycompress.bench.runtime import open_session, random_inputs
    from pycompress.pretrained import export_efficientnet_lite0

    folder = Path(tempfile.mkdtemp(prefix="bench_agent_"))
    path = export_efficientnet_lite0(folder / "lite0.onnx")
    model = path.read_bytes()
    feeds = random_inputs(open_session(path, "cpu"), 1)
    options = {"threads": args.threads, "batch": 1, "warmup": 10, "iters": args.iters}
    local_wall, remote_wall, local_p50, remote_p50, transport, put = [], [], [], [], [], []
    with running_agent() as (address, _):
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            rows = bench_models([path], **options)
            local_wall.append(time.perf_counter() - t0)
            local_p50.append(rows[0].latency_ms["p50"])
            t0 = time.perf_counter()
            rows, _ = bench_models_on_device([path], address, token=TOKEN, **options)
            remote_wall.append(time.perf_counter() - t0)
            remote_p50.append(rows[0].latency_ms["p50"])
            # The agent's own cost beyond onnxruntime: the host's wall time of one run request minus the
            # agent's time on it (request, reply, hashing, .npy), and sending the model once.
            client = DeviceClient(address, TOKEN)
            t0 = time.perf_counter()
            client.put_model(model)
            put.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run = client.run(model, feeds, threads=args.threads, warmup=10, runs=args.iters)
            transport.append(time.perf_counter() - t0 - run.agent_seconds)
            client.close()
    lw, rw = min(local_wall), min(remote_wall)
    print(f"bench EfficientNet-Lite0 ({len(model) / 1e6:.1f} MB), {args.iters} runs after 10 warm-up, "
          f"threads {args.threads or 'default'}; best of {args.repeats} interleaved passes")
    print(f"  local bench   wall {lw:6.2f} s   p50 {min(local_p50):6.2f} ms")
    print(f"  bench --device wall {rw:6.2f} s   p50 {min(remote_p50):6.2f} ms  ({100 * (rw / lw - 1):+.1f}% wall, "
          f"{100 * (min(remote_p50) / min(local_p50) - 1):+.1f}% p50: includes this machine's noise)")
    print(f"  agent transport per run request {1e3 * min(transport):.1f} ms = {100 * min(transport) / lw:.2f}% of "
          f"the local run; sending the model (once per agent, cached by hash) {1e3 * min(put):.0f} ms = "
          f"{100 * min(put) / lw:.1f}%")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delay", type=float, default=1.0, help="seconds each evaluation waits (default 1)")
    parser.add_argument("--max-evals", type=int, default=24)
    parser.add_argument("--iters", type=int, default=100, help="bench: timed runs (default 100)")
    parser.add_argument("--threads", type=int, default=0, help="bench: onnxruntime threads (default: its choice)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-agent", action="store_true")
    args = parser.parse_args()
    print(f"commit {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()}, "
          f"{os.cpu_count()} cores")
    if not args.skip_ray:
        search_bench(args)
    if not args.skip_agent:
        agent_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
