#!/usr/bin/env python3
"""A fuzzing campaign over every rdmig fuzz target at once (`make fuzz-campaign`).

Every target runs in parallel for the given time (JOBS libFuzzer worker processes each; with
one, a target that crashes is restarted for the time left). New inputs go to a scratch corpus
under target/campaign/; afterwards they are merged back into corpus/<target>/ with libFuzzer's
-merge=1, which keeps only inputs that add coverage. Crash inputs are copied to
artifacts/<target>/ (where `cargo test` replays them) with a one-line reproduction command
each, and a table sums the campaign up.

Run from anywhere: python3 fuzz/campaign.py --seconds 600 --jobs 1 [TARGET ...]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
TRIPLE = "x86_64-unknown-linux-gnu"
BIN = FUZZ / "target" / TRIPLE / "release"
# What libFuzzer names the inputs it saves when a target fails.
FAILURE_PREFIXES = ("crash-", "leak-", "timeout-", "oom-")

FINAL_STAT = re.compile(r"^stat::(\w+):\s+(\d+)")
# Plain mode progress: "#123 NEW cov: 10 ft: 20 corp: 3/40b ... exec/s: 5 rss: 30Mb".
PLAIN = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/\S+.*?exec/s: (\d+)")
# Fork mode progress: "#123: cov: 10 ft: 20 corp: 3 exec/s: 5 oom/timeout/crash: 0/0/0 ...".
FORK = re.compile(r"^#(\d+): cov: (\d+) ft: (\d+) corp: (\d+) exec/s:? (\d+)")


def targets_from_cargo_toml():
    names = re.findall(r'^name = "([^"]+)"', (FUZZ / "Cargo.toml").read_text(), re.M)
    return [n for n in names if (FUZZ / "fuzz_targets" / f"{n}.rs").exists()]


def corpus_files(d):
    return {p.name for p in d.iterdir() if p.is_file()} if d.is_dir() else set()


class Run:
    """One target's campaign: fuzzing, then merging, with what it saw."""

    def __init__(self, target, work, seconds, jobs, extra):
        self.target = target
        self.work = work / target
        self.seconds = seconds
        self.jobs = jobs
        self.extra = extra
        self.execs = 0
        self.cov = 0
        self.ft = 0
        self.fuzz_time = 0.0
        self.crashes = []
        self.new_entries = 0
        self.error = None

    def command(self, seconds):
        (self.work / "corpus").mkdir(parents=True, exist_ok=True)
        (self.work / "artifacts").mkdir(parents=True, exist_ok=True)
        cmd = [
            str(BIN / self.target),
            f"-max_total_time={max(1, int(seconds))}",
            "-print_final_stats=1",
            "-timeout=25",
            f"-artifact_prefix={self.work / 'artifacts'}/",
        ]
        d = FUZZ / "dict" / f"{self.target}.dict"
        if d.exists():
            cmd.append(f"-dict={d}")
        if self.jobs > 1:
            cmd += [f"-fork={self.jobs}", "-ignore_crashes=1", "-ignore_timeouts=1", "-ignore_ooms=1"]
        cmd += self.extra
        cmd += [str(self.work / "corpus"), str(FUZZ / "corpus" / self.target)]
        return cmd

    def fuzz(self):
        deadline = time.monotonic() + self.seconds
        attempt = 0
        with open(self.work.parent / f"{self.target}.log", "w") as log:
            while True:
                left = deadline - time.monotonic()
                if left < 1:
                    break
                attempt += 1
                log.write(f"== run {attempt}: {left:.0f}s left\n")
                log.flush()
                t0 = time.monotonic()
                p = subprocess.run(
                    self.command(left), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
                )
                self.fuzz_time += time.monotonic() - t0
                log.write(p.stdout)
                log.flush()
                self.absorb(p.stdout)
                if p.returncode == 0 or self.jobs > 1:
                    break
                if not self.new_failures():
                    # Exited without an input to show for it: not something a restart fixes.
                    self.error = f"exit status {p.returncode}, see {log.name}"
                    break
                if time.monotonic() - t0 < 5:
                    # Failing at once (on a corpus input): a restart would only fail again.
                    break
        self.crashes = sorted(
            p for p in (self.work / "artifacts").iterdir() if p.name.startswith(FAILURE_PREFIXES)
        )

    def new_failures(self):
        return any(p.name.startswith(FAILURE_PREFIXES) for p in (self.work / "artifacts").iterdir())

    def absorb(self, out):
        """Adds one libFuzzer run's executions; keeps the last coverage it reported."""
        final = {}
        last = None
        for line in out.splitlines():
            m = FINAL_STAT.match(line)
            if m:
                final[m.group(1)] = int(m.group(2))
            m = PLAIN.match(line) or FORK.match(line)
            if m:
                last = m
        if "number_of_executed_units" in final:
            self.execs += final["number_of_executed_units"]
        elif last:
            self.execs += int(last.group(1))
        if last:
            self.cov = max(self.cov, int(last.group(2)))
            self.ft = max(self.ft, int(last.group(3)))

    def merge(self):
        corpus = FUZZ / "corpus" / self.target
        corpus.mkdir(parents=True, exist_ok=True)
        before = corpus_files(corpus)
        cmd = [
            str(BIN / self.target),
            "-merge=1",
            "-timeout=25",
            f"-merge_control_file={self.work / 'merge.control'}",
            f"-artifact_prefix={self.work / 'artifacts'}/",
            str(corpus),
            str(self.work / "corpus"),
        ]
        with open(self.work.parent / f"{self.target}.merge.log", "w") as log:
            p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if p.returncode != 0 and self.error is None:
            self.error = f"merge failed (exit status {p.returncode}), see {log.name}"
        self.new_entries = len(corpus_files(corpus) - before)

    def collect(self):
        """Copies crash inputs to artifacts/<target>/; returns (path, reproduction) pairs."""
        dest = FUZZ / "artifacts" / self.target
        out = []
        for c in self.crashes:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(c, dest / c.name)
            rel = (dest / c.name).relative_to(FUZZ)
            out.append((rel, f"cd fuzz && cargo fuzz run -s none {self.target} {rel}"))
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=600, help="fuzzing time of the campaign (all targets at once)")
    ap.add_argument("--jobs", type=int, default=1, help="libFuzzer worker processes per target")
    ap.add_argument("--no-build", action="store_true", help="use the fuzz binaries as they are")
    ap.add_argument("--no-merge", action="store_true", help="leave corpus/<target>/ as it is")
    ap.add_argument("targets", nargs="*", help="default: every target in Cargo.toml")
    args, extra = ap.parse_known_args()
    targets = args.targets or targets_from_cargo_toml()
    if not args.no_build:
        subprocess.run(["cargo", "fuzz", "build", "-s", "none"], cwd=FUZZ, check=True)
    work = FUZZ / "target" / "campaign" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    runs = [Run(t, work, args.seconds, args.jobs, extra) for t in targets]
    print(
        f"fuzzing {len(runs)} targets for {args.seconds}s, {args.jobs} process(es) each; logs in {work}",
        flush=True,
    )
    threads = [threading.Thread(target=r.fuzz) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not args.no_merge:
        print("merging new coverage into corpus/<target>/", flush=True)
        for r in runs:
            r.merge()
    crashes = []
    for r in runs:
        crashes += [(r.target, *c) for c in r.collect()]

    header = ("target", "execs/s", "executions", "cov", "ft", "new corpus", "crashes")
    rows = [
        (
            r.target,
            str(int(r.execs / r.fuzz_time) if r.fuzz_time else 0),
            str(r.execs),
            str(r.cov),
            str(r.ft),
            str(r.new_entries) if not args.no_merge else "-",
            str(len(r.crashes)),
        )
        for r in runs
    ]
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"
    print()
    print(fmt(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(fmt(row))
    print()
    if crashes:
        print(f"{len(crashes)} failing input(s), now in artifacts/ (replayed by cargo test):")
        for target, path, repro in crashes:
            print(f"  {target}: {repro}")
    else:
        print("no crashes")
    errors = [(r.target, r.error) for r in runs if r.error]
    for target, e in errors:
        print(f"  {target}: {e}")
    return 1 if crashes or errors else 0


if __name__ == "__main__":
    sys.exit(main())
