"""Several models in one server against one server per model, on the same cores; and a version swap and a rollback
under load. A section of docs/serving.md.

    BENTOML_HOME=runs/export-bench/bentoml python benchmarks/serve_repository.py \
        --run32 runs/export-bench/demo-32px --run224 runs/export-bench/fashion-224px-seed0 \
        --run224 runs/export-bench/fashion-224px-seed2 [--seconds 20] [--concurrency 64]

Part 1. N models (1, 2, 4 copies of the 32 px run, each served as its own model, loaded on its own; and the
two 224 px runs): one `transferkit serve DIR`, every model in each worker (one worker per core, and one worker
with every core's threads), against N `transferkit serve RUN` (each with cores / N workers, at least one), all
on 127.0.0.1. The load is `hey` for a fixed time: one hey per
model, the concurrency split evenly over the models, each posting a real image (a scikit-learn digit as PNG at
32 px, china.jpg at 224 px) to its model. Reported: the summed req/s, the worst model's p99, non-200 answers,
and the memory of every process of the server(s) (RSS summed, read after the load).

Part 2. A swap and a rollback at `--concurrency` clients: one server serving version 1 of a 32 px model; a
version 2 folder appears at 1/3 of the run, a rollback to version 1 through the repository API at 2/3. hey's
per-request log (`-o csv`) gives p99 before the swap and in the seconds after each change, and every status.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from loadgen import run_hey  # noqa: E402
from provenance import commit, write_section  # noqa: E402

from transferkit.machine import Machine, cpu_count, load_average  # noqa: E402

BEGIN, END = "<!-- serve_repository: begin -->", "<!-- serve_repository: end -->"
KEY = "bench-key"
PAUSE_S = 10.0  # between rows: the previous row's processes gone, the load average falling


def bodies() -> dict[str, tuple[bytes, str]]:
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images

    digit = Image.fromarray((load_digits().images[0] * 255 / 16).astype(np.uint8), mode="L").resize((32, 32))
    png, jpg = io.BytesIO(), io.BytesIO()
    digit.save(png, format="PNG")
    Image.fromarray(load_sample_images().images[0]).save(jpg, format="JPEG", quality=90)
    return {"32": (png.getvalue(), "image/png"), "224": (jpg.getvalue(), "image/jpeg")}


def tree_rss_mib(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def drive(hey: str, targets: list[str], body: Path, content_type: str, concurrency: int, seconds: float):
    """One hey per target URL at once, the concurrency split evenly -> their Levels."""
    per = max(1, concurrency // len(targets))
    levels: list = [None] * len(targets)

    def one(i: int, url: str) -> None:
        levels[i] = run_hey(hey, url, body, 0, per, seconds + 60, url, content_type, seconds=seconds)

    threads = [threading.Thread(target=one, args=(i, u)) for i, u in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return levels


def summarize(levels) -> dict:
    ok = sum(level.ok_rps for level in levels)
    bad = sum(n for level in levels for code, n in level.statuses.items() if code != 200)
    bad += sum(sum(level.errors.values()) for level in levels)
    p99 = max(level.latencies.get(99, float("nan")) for level in levels) * 1000
    return {"rps": ok, "p99": p99, "bad": bad}


def measure_multi(args, hey, work, repo, names, body, content_type, workers) -> dict:
    """One server, every model in each of its `workers`."""
    from transferkit.serving import start_server

    load = load_average()
    with start_server(repo, log_path=work / f"multi{workers}.log", workers=workers, timeout=600) as server:
        urls = [f"{server.url}/predict/{m}" for m in names]
        drive(hey, urls, body, content_type, 64, 3)  # warm
        levels = drive(hey, urls, body, content_type, args.concurrency, args.seconds)
        memory = tree_rss_mib(server.process.pid)
    setup = f"one server x {workers} worker{'s' if workers > 1 else ''}, every model in each"
    return {"setup": setup, **summarize(levels), "memory": memory, "load": load}


def measure_singles(args, hey, work, runs, body, content_type) -> dict:
    """One server per model, the cores split between them."""
    from transferkit.serving import start_server

    load = load_average()
    n, workers = len(runs), max(1, cpu_count() // len(runs))
    servers = []
    try:
        for i, r in enumerate(runs):
            servers.append(start_server(r, log_path=work / f"single{i}.log", workers=workers, timeout=600))
        urls = [f"{s.url}/predict" for s in servers]
        drive(hey, urls, body, content_type, 64, 3)  # warm
        levels = drive(hey, urls, body, content_type, args.concurrency, args.seconds)
        memory = sum(tree_rss_mib(s.process.pid) for s in servers)
    finally:
        for s in servers:
            s.stop()
    setup = f"{n} server{'s' if n > 1 else ''} x {workers} worker{'s' if workers > 1 else ''}, one model each"
    return {"setup": setup, **summarize(levels), "memory": memory, "load": load, "singles": True}


def part1(args, hey: str, tmp: Path, body_files: dict) -> list[dict]:
    """Per case, every setup once per round, the order reversed every other round (a machine that slows down
    during a case does not favour one setup); a row is the rounds' mean req/s and memory, worst p99."""
    rows = []
    cases = [("32", Path(args.run32), n) for n in args.counts] + ([("224", None, 2)] if args.run224 else [])
    for size, run, n in cases:
        names = [f"m{i}" for i in range(n)]
        body, content_type = body_files[size]
        work = Path(tempfile.mkdtemp(dir=tmp))
        repo = work / "repo"
        runs = [run] * n if size == "32" else [Path(r) for r in args.run224]
        for name, r in zip(names, runs):
            (repo / name).mkdir(parents=True)
            (repo / name / "1").symlink_to(r.resolve())
        setups = [
            *(
                partial(measure_multi, args, hey, work, repo, names, body, content_type, w)
                for w in sorted({cpu_count(), 1}, reverse=True)
            ),
            partial(measure_singles, args, hey, work, runs, body, content_type),
        ]
        results: list[list[dict]] = [[] for _ in setups]
        for round_ in range(args.rounds):
            order = list(range(len(setups)))[:: 1 if round_ % 2 == 0 else -1]
            for i in order:
                time.sleep(PAUSE_S)
                results[i].append(setups[i]())
                print(f"{n} x {size} px, round {round_ + 1}:", results[i][-1], flush=True)
        for measured in results:
            rows.append(
                {
                    **measured[0],
                    "case": f"{n} x {size} px",
                    "rps": float(np.mean([m["rps"] for m in measured])),
                    "rps_each": [m["rps"] for m in measured],
                    "p99": max(m["p99"] for m in measured),
                    "bad": sum(m["bad"] for m in measured),
                    "memory": float(np.mean([m["memory"] for m in measured])),
                    "load": max(m["load"] for m in measured),
                }
            )
    return rows


def hey_csv(hey: str, url: str, body: Path, content_type: str, c: int, seconds: float, out: list) -> None:
    cmd = [
        hey,
        "-z",
        f"{seconds:g}s",
        "-c",
        str(c),
        "-m",
        "POST",
        "-t",
        "20",
        "-T",
        content_type,
        "-o",
        "csv",
        "-H",
        f"Authorization: Bearer {KEY}",
        "-D",
        str(body),
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    out.extend(csv.DictReader(io.StringIO(done.stdout)))


def part2(args, hey: str, tmp: Path, body_files: dict) -> dict:
    import httpx

    from transferkit.serving import start_server

    body, content_type = body_files["32"]
    work = Path(tempfile.mkdtemp(dir=tmp))
    repo = work / "repo"
    (repo / "digits").mkdir(parents=True)
    (repo / "digits" / "1").symlink_to(Path(args.run32).resolve())
    (work / "key").write_text(KEY)
    seconds = args.swap_seconds
    records: list = []
    events = {}
    with start_server(repo, log_path=work / "swap.log", api_key_file=work / "key", poll_s=0.5, timeout=600) as server:
        url = f"{server.url}/predict/digits"
        run_hey(hey, url, body, 0, 64, 60, "warm", content_type, seconds=3, headers={"Authorization": f"Bearer {KEY}"})
        driver = threading.Thread(
            target=hey_csv, args=(hey, url, body, content_type, args.concurrency, seconds, records)
        )
        start = time.monotonic()
        driver.start()
        time.sleep(seconds / 3)
        events["swap"] = time.monotonic() - start
        (repo / "digits" / "2").symlink_to(Path(args.run32).resolve())  # a new version folder
        while True:  # until the index shows version 2 as the default
            rows = httpx.post(f"{server.url}/v2/repository/index", headers={"Authorization": f"Bearer {KEY}"}).json()
            if any(r["version"] == "2" and r.get("default") for r in rows):
                break
            time.sleep(0.1)
        events["swapped"] = time.monotonic() - start
        time.sleep(max(0.0, 2 * seconds / 3 - (time.monotonic() - start)))
        events["rollback"] = time.monotonic() - start
        answer = httpx.post(
            f"{server.url}/v2/repository/models/digits/load",
            json={"parameters": {"version": "1"}},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
        )
        events["rolled back"] = time.monotonic() - start
        events["rollback status"] = answer.status_code
        driver.join()
    offsets = np.array([float(r["offset"]) for r in records])
    latency = np.array([float(r["response-time"]) for r in records]) * 1000
    status = np.array([int(r["status-code"] or 0) for r in records])
    skew = 0.2  # hey starts its clock a moment after the thread: windows are widened by this much

    def p99(lo: float, hi: float) -> float:
        sel = (offsets >= lo) & (offsets < hi)
        return float(np.percentile(latency[sel], 99)) if sel.any() else float("nan")

    before = p99(1.0, events["swap"] - skew)
    return {
        "requests": len(records),
        "non-200": int((status != 200).sum()),
        "p99 before": before,
        "p99 swap": p99(events["swap"] - skew, events["swapped"] + 2.0),
        "p99 rollback": p99(events["rollback"] - skew, events["rolled back"] + 2.0),
        "swap s": events["swapped"] - events["swap"],
        "rollback s": events["rolled back"] - events["rollback"],
        "rollback status": events["rollback status"],
    }


def render(rows: list[dict], swaps: list[dict], args, machine) -> str:
    lines = [
        BEGIN,
        "## Several models in one server (model repository)",
        "",
        f"Command: `python benchmarks/serve_repository.py {' '.join(sys.argv[1:])}` at commit {commit()}. Machine: "
        f"{machine.cpu} ({cpu_count()} CPUs; {' '.join(machine.flags)}).",
        "",
        f"hey for {args.seconds:g} s per setup and round ({args.rounds} rounds, the order reversed every other "
        f"round), {args.concurrency} clients split evenly over the models, each posting "
        "a real image to its model (a digit PNG at 32 px, china.jpg at 224 px). One server holds every model in each of "
        "its workers (one worker per core, or one worker with every core's runtime threads); each of the N servers "
        "holds one, the cores split between them. The 32 px models are copies of one "
        "run, each loaded as its own model; the 224 px pair are two runs. Memory: RSS of every process of the "
        "server(s), after the load.",
        "",
        "| models | setup | req/s (200): mean (each round) | worst model's p99 ms, worst round | non-200 | memory MiB | req/s vs one server per model | memory vs one server per model | load avg before, highest |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    singles = {r["case"]: r for r in rows if r.get("singles")}
    for r in rows:
        base = singles[r["case"]]
        ratios = "| | |" if r is base else f"| {r['rps'] / base['rps']:.2f}x | {r['memory'] / base['memory']:.2f}x |"
        lines.append(
            f"| {r['case']} | {r['setup']} | {r['rps']:,.0f} ({', '.join(f'{x:,.0f}' for x in r['rps_each'])}) "
            f"| {r['p99']:.0f} | {r['bad']} | {r['memory']:,.0f} "
            f"{ratios} {r['load']:.2f} |"
        )
    lines += [
        "",
        f"A swap and a rollback under load ({args.concurrency} clients, {args.swap_seconds:g} s, one 32 px model, "
        f"one server; {args.rounds} runs): a version 2 folder appears at a third of the run, a rollback to version 1 through "
        "`POST /v2/repository/models/digits/load` at two thirds. p99 in the window from each change until 2 s "
        "after it took effect in every worker:",
        "",
        "| requests | non-200 | p99 before ms | p99 during the swap ms | p99 during the rollback ms | swap took s | rollback call took s (status) |",
        "|--:|--:|--:|--:|--:|--:|--:|",
        *(
            f"| {swap['requests']:,} | {swap['non-200']} | {swap['p99 before']:.0f} | {swap['p99 swap']:.0f} "
            f"| {swap['p99 rollback']:.0f} | {swap['swap s']:.1f} | {swap['rollback s']:.1f} "
            f"({swap['rollback status']}) |"
            for swap in swaps
        ),
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run32", required=True)
    ap.add_argument("--run224", action="append", default=[])
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2, help="each setup this many times per case, order alternating")
    ap.add_argument("--swap-seconds", type=float, default=30.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "docs" / "serving.md"))
    args = ap.parse_args()
    hey = shutil.which("hey")
    if hey is None:
        sys.exit("hey is needed (apt-get install hey)")
    machine = Machine.this()
    with tempfile.TemporaryDirectory(prefix="transferkit-serve-repository-") as tmp:
        files = {}
        for size, (data, content_type) in bodies().items():
            path = Path(tmp) / f"body{size}"
            path.write_bytes(data)
            files[size] = (path, content_type)
        rows = part1(args, hey, Path(tmp), files)
        swaps = [part2(args, hey, Path(tmp), files) for _ in range(args.rounds)]
    section = render(rows, swaps, args, machine)
    print(section)
    write_section(args.out, section, BEGIN, END)


if __name__ == "__main__":
    main()
