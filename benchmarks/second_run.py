"""A second local run on the same data: what the folder's store kept (issue 22 §5) against a first run.

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.second_run [--images 170] [--iterations 200] [--write]

Two `sam-pipeline run --demo --demo-images N -g cpu -i ITERATIONS` in one fresh working folder, at the seed's other
training defaults (25 objects, batch 1, validation every 2): the first starts from an empty store; the second adds
`--force` (unchanged data and weights would otherwise skip training once a champion is registered) and finds the
dataset and the embeddings the first one stored in `local_outputs/store/objects/`. Then the store's start: a
server started on that folder against one on an empty folder (seconds until it answers, resident memory).
The demo images are small (96-160 px), but SAM resizes every image to 1024 px before its encoder and trains on
the embeddings, so embedding and training cost per image are those of Penn-Fudan's photos.
--write replaces the "## Second local run" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.e2e import timed_run
from benchmarks.results import write_section

SECTION = "## Second local run"
COMMAND = ("PYTHONPATH=$PWD .venv/bin/python -m benchmarks.second_run --images {images} --iterations {iterations} "
           "--write")


def _run(work: Path, env: dict, images: int, iterations: int, *extra: str) -> dict:
    out = work / f"summary-{len(list(work.glob('summary-*')))}.json"
    wall, s = timed_run([sys.executable, "-m", "pipelines.cli", "run", "--demo", "--demo-images", str(images), "-g",
                         "cpu", "-i", str(iterations), *extra], work, env, out)
    embed = [shard["artifacts"]["index"]["metadata"] for shard in s["tasks"]["embed"]["shards"]]
    return {"wall": wall, "tasks": {name: info.get("seconds") for name, info in s["tasks"].items()},
            "computed": sum(e["computed"] for e in embed), "from_store": sum(e["from_store"] for e in embed),
            "uploaded": s["dataset"].get("uploaded"), "registered": (s.get("registered") or {}).get("version")}


def _server_start(objects: Path) -> tuple[float, float]:
    """(seconds until a server on `objects` answers, its resident memory in MB)."""
    from components import s3server

    t = time.perf_counter()
    proc, _ = s3server.start_server(f"pid:{os.getpid()}", objects=objects)
    seconds = time.perf_counter() - t
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:")) / 1024
    proc.kill()
    proc.wait()
    return seconds, rss


def measure(images: int, iterations: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        env = {**os.environ, "SAM_MODELS": str(Path(tmp) / "models")}
        first = _run(work, env, images, iterations)
        second = _run(work, env, images, iterations, "--force")
        objects = work / "local_outputs" / "store" / "objects"
        stored = sum(p.stat().st_size for p in objects.rglob("*") if p.is_file()) / 1e6
        count = sum(1 for p in objects.rglob("*") if p.is_file())
        (Path(tmp) / "empty").mkdir()
        empty, full = _server_start(Path(tmp) / "empty"), _server_start(objects)
    return {"first": first, "second": second, "stored_mb": stored, "objects": count, "empty": empty, "full": full,
            "images": images, "iterations": iterations, "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": len(os.sched_getaffinity(0)), "date": datetime.date.today().isoformat()}


def table(r: dict) -> str:
    first, second = r["first"], r["second"]
    tasks = [t for t in first["tasks"] if first["tasks"][t] is not None or second["tasks"][t] is not None]
    cell = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
    lines = [SECTION, "", f"`{COMMAND.format(**r)}`", "",
             f"{r['cpus']} CPU cores ({r['machine']}, shared with other work: timings are noisy), Python "
             f"{r['python']}, no GPU, {r['date']}. Two `sam-pipeline run --demo --demo-images {r['images']} -g cpu "
             f"-i {r['iterations']}` in one working folder, the seed's other defaults; the second with `--force` "
             "(it would otherwise skip: same data, same weights). Task seconds are kfp.local's (process start "
             "included).", "",
             "| | first run | second run (`--force`) |", "|---|---:|---:|"]
    lines += [f"| {t} | {cell(first['tasks'][t])} | {cell(second['tasks'][t])} |" for t in tasks]
    lines += [f"| **total (wall)** | **{first['wall']:.1f}** | **{second['wall']:.1f}** |",
              f"| embeddings computed / from the store | {first['computed']} / {first['from_store']} | "
              f"{second['computed']} / {second['from_store']} |",
              f"| dataset objects uploaded | {first['uploaded']} | {second['uploaded']} |",
              f"| registered | {first['registered'] or '-'} | {second['registered'] or '-'} |", "",
              f"The store kept {r['objects']} objects, {r['stored_mb']:.0f} MB, in `local_outputs/store/objects/`. "
              f"A server started on it answered after {r['full'][0]:.2f} s with {r['full'][1]:.0f} MB resident, "
              f"one on an empty folder after {r['empty'][0]:.2f} s with {r['empty'][1]:.0f} MB: a starting server "
              "reads each object's header line only, and bytes when a client asks for them."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=170, help="images of the synthetic dataset (Penn-Fudan: 170)")
    parser.add_argument("--iterations", type=int, default=200, help="training iterations (the seed's: 200)")
    parser.add_argument("--write", action="store_true", help="update the section of RESULTS.md")
    args = parser.parse_args()
    section = table(measure(args.images, args.iterations))
    print(section)
    if args.write:
        write_section(SECTION, section)


if __name__ == "__main__":
    main()
