"""`python -m benchmarks.cpu_scaling`: how the CPU training step scales from one core to all of them.

    python -m benchmarks.cpu_scaling                     # mini and advanced, 2 rounds
    python -m benchmarks.cpu_scaling --presets mini --rounds 3
    python -m benchmarks.cpu_scaling --quick             # a smoke run: tiny shapes, no files

The issue this answers: on an Intel Xeon jaxllm's training step beat PyTorch's on one core and lost on
two. Each configuration runs in its own child process, pinned with `sched_setaffinity` before JAX or
PyTorch start (so their thread pools size themselves to the cores they get):

- `jaxllm`: the jitted train step on one XLA device (`benchmarks.speed`'s runner), 1 core and all cores;
- `jaxllm, one CPU device per core`: all cores split into XLA CPU devices (`JAX_NUM_CPU_DEVICES`), the
  batch sharded over them by the `data` mesh axis (`jaxllm.train.sharded_train_step`, as
  `JAX_NUM_CPU_DEVICES=2 jaxllm train ... mesh.data=2` runs it);
- `torch_ref eager`: `PlainTrainer`, 1 core (`torch.set_num_threads(1)`) and all cores.

Configurations run in turn, `--rounds` times (a child each time); each figure is the median over every
round's timings, so a machine whose speed drifts during the run shifts all rows alike. Scaling = the
1-core step time / the all-core step time. Results per CPU model: `cpu_scaling_<cpu>.json` and `.md`
under benchmarks/results (`<cpu>`: `intel-xeon`, `amd-epyc`, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.machine import RESULTS, cpu_slug, describe, machine_info, scaling_goal, training_goal, write_results

JAX, JAX_DEVICES, EAGER = "jaxllm", "jaxllm, one CPU device per core", "torch_ref eager"
IMPLS = (JAX, JAX_DEVICES, EAGER)


def configurations(cores: int) -> list[tuple[str, int]]:
    """(implementation, cores) pairs; one CPU device per core only makes sense on several cores."""
    out = [(JAX, 1), (EAGER, 1), (JAX, cores), (EAGER, cores)]
    if cores > 1:
        out.append((JAX_DEVICES, cores))
    return out


# The child: one configuration, timed -------------------------------------------------------------


def child(impl: str, cores: int, preset: str, reps: int, quick: bool) -> dict:
    """Time one configuration in this process; call before anything has imported JAX or torch."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    # One XLA CPU device unless split per core (an inherited device-count flag would override this).
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(f for f in flags if "host_platform_device_count" not in f)
    os.environ["JAX_NUM_CPU_DEVICES"] = str(cores if impl == JAX_DEVICES else 1)
    import jax
    import torch

    import jaxllm
    from benchmarks import speed

    jaxllm.keep_freed_host_memory()
    torch.set_num_threads(cores)
    shape = speed.SHAPES["cpu"][preset]
    if quick:
        shape = speed.Shape(4, 32, 1, 4, 8)
    cfg = speed.load_config(preset, "cpu", shape)  # mesh.data -1: the batch over every XLA device
    params = jaxllm.init_params(cfg.model, 0)
    steps = shape.steps_per_timing
    if impl == EAGER:
        run = speed.torch_train_runner(cfg, jaxllm.to_torch_state_dict(cfg.model, params), "cpu", False, steps)
    else:  # one device, or the batch over every XLA CPU device (the `data` mesh axis)
        from jaxllm.sharding import make_mesh

        run = speed.jax_train_runner(cfg, params, steps, make_mesh(cfg.mesh) if impl == JAX_DEVICES else None)
    seconds = speed.timings({impl: run}, reps, quiet=False)[impl]
    return {"seconds_per_step": [s / steps for s in seconds], "xla_devices": len(jax.devices()),
            "torch_threads": torch.get_num_threads(), "cores": len(os.sched_getaffinity(0))}  # fmt: skip


# The parent: children in rounds, the table ---------------------------------------------------------


def run_child(impl: str, cores: int, preset: str, reps: int, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.cpu_scaling", "--child", impl, "--cores", str(cores),
           "--presets", preset, "--reps", str(reps), *(["--quick"] if quick else [])]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"{impl} on {cores} core(s), {preset}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(presets: list[str], cores: int, rounds: int, reps: int, quick: bool) -> list[dict]:
    rows = []
    for preset in presets:
        seconds: dict[tuple[str, int], list[float]] = {c: [] for c in configurations(cores)}
        for r in range(rounds):
            for impl, n in seconds:
                got = run_child(impl, n, preset, reps, quick)
                seconds[(impl, n)] += got["seconds_per_step"]
                print(f"{preset} round {r + 1}: {impl}, {n} core(s): "
                      f"{statistics.median(got['seconds_per_step']) * 1e3:.1f} ms/step", flush=True)  # fmt: skip
        for (impl, n), s in seconds.items():
            rows.append({"preset": preset, "impl": impl, "cores": n, "median_s": statistics.median(s),
                         "min_s": min(s), "max_s": max(s), "timings": len(s)})  # fmt: skip
    return rows


def _find(rows: list[dict], preset: str, impl: str, cores: int) -> dict | None:
    return next((r for r in rows if (r["preset"], r["impl"], r["cores"]) == (preset, impl, cores)), None)


def summary_rows(rows: list[dict], cores: int) -> list[dict]:
    """Per preset and implementation: 1-core and all-core step, scaling, and the all-core ratio to torch."""
    out = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        eager_all = _find(rows, preset, EAGER, cores)
        for impl in IMPLS:
            many = _find(rows, preset, impl, cores)
            if many is None:
                continue
            one = _find(rows, preset, JAX if impl == JAX_DEVICES else impl, 1)
            out.append({"preset": preset, "impl": impl, "one_core_s": one["median_s"], "all_cores_s": many["median_s"],
                        "scaling": one["median_s"] / many["median_s"],
                        "vs_eager": eager_all["median_s"] / many["median_s"]})  # fmt: skip
    return out


def markdown(data: dict) -> str:
    run, cores = data["run"], data["run"]["cores"]
    lines = [
        "# CPU training step: one core vs all cores",
        "",
        f"Command: `{run['command']}`. Each configuration in its own process, pinned to its cores; "
        f"configurations in turn, {run['rounds']} rounds of {run['reps']} timings; medians over all rounds.",
        "",
        f"Machine: {describe(data['machine'])}; load average {run['load_average_at_end']} at end. Scaling: the "
        f"1-core step time ÷ the {cores}-core one (jaxllm with one CPU device per core: ÷ jaxllm's 1-core step).",
        "",
        f"| preset | implementation | 1 core, ms/step | {cores} cores, ms/step | scaling | vs torch_ref eager "
        f"({cores} cores) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in data["summary"]:
        lines.append(f"| {s['preset']} | {s['impl']} | {s['one_core_s'] * 1e3:.1f} | {s['all_cores_s'] * 1e3:.1f} | "
                     f"{s['scaling']:.2f}x | {s['vs_eager']:.2f}x |")  # fmt: skip
    cpu = data["machine"]["cpu"]
    scaling = scaling_goal(cpu)
    lines += ["", f"Goals (issue 15, on {cpu}): jaxllm's training step >= the ratio to torch_ref eager below"
              + (f", with {cores}-core scaling >= {scaling}x." if scaling else "."), ""]  # fmt: skip
    for s in data["summary"]:
        if s["impl"] == JAX:
            vs_eager = training_goal(cpu, s["preset"])
            ok = s["vs_eager"] >= vs_eager and s["scaling"] >= (scaling or 0)
            lines.append(f"- {s['preset']}: {s['vs_eager']:.2f}x eager (goal >= {vs_eager}x), scaling "
                         f"{s['scaling']:.2f}x ({'met' if ok else 'NOT met'})")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["mini", "advanced"], choices=["mini", "advanced", "gpt2-124m"])
    parser.add_argument("--rounds", type=int, default=2, help="children per configuration, in turn")
    parser.add_argument("--reps", type=int, default=5, help="timings per child")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, 1 round of 2, no files")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.cores, args.presets[0], args.reps, args.quick)))
        return
    rounds, reps = (1, 2) if args.quick else (args.rounds, args.reps)
    info = machine_info()
    cores = len(os.sched_getaffinity(0))  # the cores this process may use (os.cpu_count() ignores pinning)
    rows = measure(args.presets, cores, rounds, reps, args.quick)
    run = {"command": " ".join(["python -m benchmarks.cpu_scaling", *sys.argv[1:]]), "rounds": rounds, "reps": reps,
           "cores": cores, "load_average_at_end": round(os.getloadavg()[0], 2)}  # fmt: skip
    data = {"machine": info, "run": run, "rows": rows, "summary": summary_rows(rows, cores)}
    md = markdown(data)
    print(md)
    if not args.quick:
        write_results(f"cpu_scaling_{cpu_slug(info['cpu'])}", data, md, args.out)


if __name__ == "__main__":
    main()
