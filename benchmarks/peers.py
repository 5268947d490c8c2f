"""opensd beside its peers, stable-diffusion.cpp and OpenVINO, on the same weights.

Every engine runs in its own process (``peer_worker.py`` under the engine's own Python:
opensd in the project's, each peer in a venv of its own, so a peer can never break the
project's) and makes whole txt2img generations with the same prompt, negative prompt,
seed, size, CFG scale and number of Euler steps. The weights are written once
(``peer_weights.py``): a single original-layout file that stable-diffusion.cpp reads and
a diffusers folder from the same tensors that opensd loads and optimum-intel exports.

Timing: for each peer variant (stable-diffusion.cpp q8_0, f16, f32; OpenVINO f32, bf16)
one block in which opensd (default precision ``auto``, and ``fp32`` unless auto is fp32
on this machine) and the peer are timed in turn, opensd-auto, opensd-fp32, peer, ...,
after one warm-up call of each worker (opensd's stay loaded and warm across blocks);
medians of whole-generation seconds; ratio ``opensd / peer`` of the medians (lower is
better). Blocks run each peer's first variant before any peer's second, so a run cut
short still covers every peer; the JSON is rewritten after every block, with the load
averages. The issue's targets: against stable-diffusion.cpp's fastest type <= 0.5,
against OpenVINO <= 1.0. A peer whose venv or package is missing is skipped with a line,
one that cannot load a model gets its error in the table instead of a number, and
OpenVINO bf16 is not run on a CPU without native bf16 (it would be f32 again).

Usage (from the repository root)::

    PYTHONPATH=src python3 benchmarks/peers.py --models sd15 --size 256 --json docs/bench/peers-256.json
    PYTHONPATH=src python3 benchmarks/peers.py --models tiny --repeats 5
    PYTHONPATH=src python3 benchmarks/peers.py --models sd15 --size 256 --steps 2 --repeats 2 --sdcpp-types q8_0,f16

Peers: ``--sdcpp-python`` (default /work/peers/sdcpp/bin/python, with
``stable-diffusion-cpp-python``), ``--openvino-python`` (default
/work/peers/openvino/bin/python, with ``optimum-intel[openvino]``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peer_weights
from harness import cpu_flags, cpu_model

HERE = Path(__file__).resolve().parent
WORKER = HERE / "peer_worker.py"
PROMPT = "a red circle above a blue square"
NEGATIVE = "a green triangle"
SDCPP_TYPES = ("q8_0", "f16", "f32")
OPENVINO_TYPES = ("f32", "bf16")
OPENSD_VARIANTS = ("auto", "fp32")
PEER_PACKAGES = {"sdcpp": "stable_diffusion_cpp", "openvino": "optimum.intel"}
PEER_DISTS = {"sdcpp": ("stable-diffusion-cpp-python",), "openvino": ("optimum-intel", "openvino", "diffusers", "torch")}
TARGETS = {"sdcpp": 0.5, "openvino": 1.0}  # opensd/peer time, against the peer's fastest variant


@dataclass(frozen=True)
class Job:
    """What every engine of one model runs with."""

    model: str
    width: int
    height: int
    steps: int
    cfg: float
    seed: int
    threads: int


class Worker:
    """One engine's process: loaded once, then one timed generation per :meth:`run`."""

    def __init__(self, python: str, engine: str, variant: str, model: str, job: Job, cache: Path, env: dict[str, str]):
        self.label = f"{engine} {variant}"
        spec = {"engine": engine, "variant": variant, "model": model, "width": job.width, "height": job.height,
                "steps": job.steps, "cfg": job.cfg, "seed": job.seed, "prompt": PROMPT, "negative": NEGATIVE,
                "threads": job.threads, "cache": str(cache)}
        self.proc = subprocess.Popen([python, str(WORKER), json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.ready = self._read()
        self.load_s = self.ready.get("load_s")
        self.info: dict[str, str] = self.ready.get("info", {})
        self.error = self.ready.get("error")
        self.warm = False  # one untimed generation done (the first pays one-time costs)

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            return {"error": f"worker exited with code {self.proc.wait()} before answering"}
        return json.loads(line)

    def run(self) -> float:
        """Seconds of one whole generation; raises RuntimeError with the worker's error."""
        if self.error:
            raise RuntimeError(self.error)
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            self.error = reply["error"]
            raise RuntimeError(self.error)
        self.info.update(reply.get("info", {}))  # what a run learned (opensd: its kernel choice, made on the first)
        return reply["s"]

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Block:
    """One peer variant timed in turn with opensd's variants."""

    peer: str
    variant: str
    times: dict[str, list[float]] = field(default_factory=dict)
    load_s: dict[str, float | None] = field(default_factory=dict)
    info: dict[str, dict[str, str]] = field(default_factory=dict)
    error: str | None = None
    load: str = ""  # the machine's load averages when the block ended

    def median(self, label: str) -> float | None:
        """Median seconds of ``label``; "opensd fp32" is opensd auto's where auto is fp32 here."""
        t = self.times.get(label)
        if not t and label == "opensd fp32" and self.info.get("opensd auto", {}).get("dtype") == "float32":
            t = self.times.get("opensd auto")
        return statistics.median(t) if t else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peer": self.peer, "variant": self.variant, "times_s": self.times,
                               "load_s": self.load_s, "info": self.info, "error": self.error, "load": self.load,
                               "median_s": {k: self.median(k) for k in [*self.times, "opensd fp32"]
                                            if self.median(k) is not None}}
        peer = self.median(f"{self.peer} {self.variant}")
        if peer:
            out["ratio_opensd_over_peer"] = {v: self.median(f"opensd {v}") / peer
                                             for v in OPENSD_VARIANTS if self.median(f"opensd {v}")}
        return out


def timed_block(block: Block, workers: list[Worker], repeats: int) -> None:
    """One warm-up call for each worker not yet warm, then ``repeats`` rounds of worker 1, 2, ...; a failing worker ends its own row."""
    alive = [w for w in workers if not w.error]
    for w in workers:
        block.load_s[w.label] = w.load_s
        block.info[w.label] = w.info
        if w.error:
            block.times[w.label] = []
    for w in [w for w in alive if not w.warm]:
        try:
            w.run()
            w.warm = True
        except RuntimeError:
            alive.remove(w)
    for _ in range(repeats):
        for w in list(alive):
            try:
                block.times.setdefault(w.label, []).append(w.run())
            except RuntimeError:
                alive.remove(w)


# ----------------------------------------------------------------------------- the peers


def peer_python(python: str | None, engine: str) -> tuple[str | None, str]:
    """(interpreter, why not): the peer's interpreter when it has the peer's package."""
    if not python or not Path(python).exists():
        return None, f"{engine}: skipped, no interpreter at {python} (see docs/benchmarks.md for the venv)"
    probe = subprocess.run([python, "-c", f"import {PEER_PACKAGES[engine]}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f"{engine}: skipped, {python} cannot import {PEER_PACKAGES[engine]}"
    return python, ""


def dist_versions(python: str, names: tuple[str, ...]) -> dict[str, str | None]:
    code = (f"import json, importlib.metadata as m\nout = {{}}\nfor n in {names!r}:\n    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = None\nprint(json.dumps(out))")
    probe = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(probe.stdout) if probe.returncode == 0 else {}


def skip_variant(engine: str, variant: str) -> str:
    """Why ``engine``'s ``variant`` is not timed on this machine ("" when it is)."""
    flags = cpu_flags()
    if engine == "openvino" and variant == "bf16" and not (flags.get("avx512_bf16") or flags.get("amx_bf16")):
        return "openvino bf16: not run, this CPU has neither avx512_bf16 nor amx_bf16 (OpenVINO's CPU plugin would run f32)"
    return ""


def opensd_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def peer_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the project's sources stay out of a peer
    env["HF_HUB_OFFLINE"] = "1"
    return env


def plan(args: argparse.Namespace, peers: dict[str, str]) -> list[tuple[str, str]]:
    """(engine, variant) blocks in the order they run: each peer's first variant before any
    peer's second, so that a run cut short still has every peer (``--variants`` orders them)."""
    chosen = {e: [v for v in getattr(args, f"{e}_types").split(",") if v] for e in ("sdcpp", "openvino") if e in peers}
    out: list[tuple[str, str]] = []
    for i in range(max((len(v) for v in chosen.values()), default=0)):
        out += [(e, vs[i]) for e, vs in chosen.items() if i < len(vs)]
    return out


def bench_model(name: str, size: int, args: argparse.Namespace, peers: dict[str, str],
                save: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
    """All blocks of one model at ``size``²: the opensd workers stay loaded, the peers come one
    at a time; ``save`` gets the result so far after every block."""
    files = peer_weights.write(args.weights, name)
    job = Job(name, size, size, args.steps, args.cfg, args.seed, args.threads)
    cache, models = args.weights / name, {"sdcpp": files.single_file, "openvino": files.diffusers}
    ours = [Worker(sys.executable, "opensd", "auto", str(files.diffusers), job, cache, opensd_env())]
    notes: list[str] = []
    if ours[0].info.get("dtype") == "float32":  # the same work twice: time it once
        notes.append(f"opensd fp32 is opensd auto here ({ours[0].info.get('reason')})")
    elif not args.opensd_fp32:
        notes.append("opensd fp32 not run (--no-opensd-fp32)")
    else:
        ours.append(Worker(sys.executable, "opensd", "fp32", str(files.diffusers), job, cache, opensd_env()))
    blocks: list[Block] = []
    result = {"model": name, "size": size, "steps": args.steps, "cfg": args.cfg, "seed": args.seed,
              "threads": args.threads, "blocks": [], "opensd_errors": {}, "notes": notes}
    try:
        for engine, variant in plan(args, peers):
            why = skip_variant(engine, variant)
            if why:
                notes.append(why)
                print(f"# {why}", flush=True)
                continue
            print(f"# {name} {size}²: opensd vs {engine} {variant}", flush=True)
            peer = Worker(peers[engine], engine, variant, str(models[engine]), job, cache, peer_env())
            block = Block(engine, variant, error=peer.error)
            try:
                timed_block(block, [*ours, peer], args.repeats)
            finally:
                peer.close()
            block.error, block.load = block.error or peer.error, uptime()
            blocks.append(block)
            print("#   " + ", ".join(f"{k} {fmt(block.median(k))}" for k in block.times)
                  + (f"; {engine} error: {block.error}" if block.error else ""), flush=True)
            result["blocks"] = [b.to_json() for b in blocks]
            save(result)
    finally:
        for w in ours:
            w.close()
    result["opensd_errors"] = {w.label: w.error for w in ours if w.error}
    return result


# ----------------------------------------------------------------------------- report


def uptime() -> str:
    """The machine's load averages (1, 5, 15 min), to be written beside the numbers."""
    try:
        return "load average: " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def fmt(x: float | None) -> str:
    return "—" if x is None else (f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s")


def table(result: dict[str, Any]) -> str:
    """One model's rows: each peer variant beside opensd's two, and the verdict on the targets."""
    head = (f"| {result['model']} {result['size']}², {result['steps']} Euler steps, CFG {result['cfg']} | peer median "
            "| opensd auto median | opensd fp32 median | auto/peer | fp32/peer |\n|---|---:|---:|---:|---:|---:|")
    lines, best = [head], {}
    for b in result["blocks"]:
        med, label = b["median_s"], f"{b['peer']} {b['variant']}"
        peer = med.get(label)
        if b["error"] or peer is None:
            lines.append(f"| {label} | cannot run: {b['error'] or 'no timing'} | | | | |")
            continue
        r = b.get("ratio_opensd_over_peer", {})
        lines.append(f"| {label} | {fmt(peer)} | {fmt(med.get('opensd auto'))} | {fmt(med.get('opensd fp32'))} "
                     f"| {r.get('auto', float('nan')):.2f} | {r.get('fp32', float('nan')):.2f} |")
        if b["peer"] not in best or peer < best[b["peer"]][0]:
            best[b["peer"]] = (peer, b["variant"], r.get("auto"))
    for peer, (t, variant, ratio) in best.items():
        if ratio is not None:
            verdict = "met" if ratio <= TARGETS[peer] else "not met"
            lines.append(f"\nTarget vs {peer}'s fastest ({variant}, {fmt(t)}): opensd auto/peer = {ratio:.2f}, "
                         f"target <= {TARGETS[peer]} ({verdict}).")
    lines += [f"\nNote: {n}." for n in result.get("notes", [])]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sd15,tiny", help=f"comma-separated subset of {', '.join(peer_weights.MODELS)}")
    p.add_argument("--size", type=int, default=None, help="image side of sd15 (default 256); tiny runs at 32")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed generations per engine and block")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of every engine")
    p.add_argument("--weights", type=Path, default=Path("/work/peers/weights"), help="where the shared weights are written")
    p.add_argument("--sdcpp-python", default="/work/peers/sdcpp/bin/python")
    p.add_argument("--openvino-python", default="/work/peers/openvino/bin/python")
    p.add_argument("--peers", default="sdcpp,openvino", help="comma-separated subset of sdcpp, openvino")
    p.add_argument("--sdcpp-types", default=",".join(SDCPP_TYPES), help=f"stable-diffusion.cpp weight types, in order (of {', '.join(SDCPP_TYPES)})")
    p.add_argument("--openvino-types", default=",".join(OPENVINO_TYPES), help=f"OpenVINO inference precisions, in order (of {', '.join(OPENVINO_TYPES)})")
    p.add_argument("--no-opensd-fp32", dest="opensd_fp32", action="store_false",
                   help="time opensd in its default precision only: one worker less in memory (every worker stays "
                        "loaded, and auto packs convolutions only when the copies fit a quarter of the memory available)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    bad = [m for m in args.models.split(",") if m not in peer_weights.MODELS]
    if bad:
        p.error(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(peer_weights.MODELS)}")
    if args.size is not None and (args.size < 64 or args.size % 64):
        p.error("--size must be a multiple of 64")
    for engine, allowed in (("sdcpp", SDCPP_TYPES), ("openvino", OPENVINO_TYPES)):
        unknown = [v for v in getattr(args, f"{engine}_types").split(",") if v and v not in allowed]
        if unknown:
            p.error(f"unknown --{engine}-types {', '.join(unknown)}; choose from {', '.join(allowed)}")
    if args.repeats < 1 or args.steps < 1:
        p.error("--repeats and --steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    pythons = {"sdcpp": args.sdcpp_python, "openvino": args.openvino_python}
    peers, versions = {}, {}
    for engine in [e for e in args.peers.split(",") if e]:
        python, why = peer_python(pythons.get(engine), engine)
        if python is None:
            print(f"# {why}", flush=True)
            continue
        peers[engine] = python
        versions[engine] = dist_versions(python, PEER_DISTS[engine])
    import torch

    flags = cpu_flags()
    report: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": cpu_model(), "cpu_flags": flags, "cores": os.cpu_count(), "torch": torch.__version__},
        "load_before": uptime(), "peer_versions": versions, "skipped": [e for e in args.peers.split(",") if e and e not in peers], "results": [],
    }
    print(f"# {report['date']}: {cpu_model()} (flags: {' '.join(f for f, h in flags.items() if h)}), "
          f"torch {torch.__version__}, peers {versions}", flush=True)
    t0 = time.perf_counter()
    for name in args.models.split(","):
        size = 32 if name == "tiny" else (args.size or 256)
        done = list(report["results"])

        def save(result: dict[str, Any], done: list[Any] = done) -> None:
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({**report, "results": [*done, result], "load_now": uptime()}, indent=2))

        report["results"].append(bench_model(name, size, args, peers, save))
        save(report["results"][-1])
    report["total_s"] = time.perf_counter() - t0
    report["load_after"] = uptime()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    for result in report["results"]:
        print("\n" + table(result))
    print(f"\ntotal {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
