#!/usr/bin/env python3
"""Which of the untimed GPU options beat the defaults in one device-check run.

    python3 scripts/device-winners.py BENCH_GPU_TXT TEST_CUDA_TXT ENV_OUT

Reads the per-layer device times (CMSEG_GPU_PROFILE rows) that each candidate stage of
scripts/device-check.sh appended to bench_gpu.txt after its "=== stage NAME" marker,
compares each option on the layers it changes against the default run (stage
bench_gpu) of the same call, and writes the options that won as NAME=VALUE lines to
ENV_OUT, for the stages after it (whole-model parity, the Node benchmark) to run
under. Prints one "winners:" line per option with the numbers behind its choice.

Why per layer and not the step: every run times cuDNN's paths anew and may keep
another one for a shape, and the profiled step includes host time, so a step median
moves by a few percent between identical runs; a layer's device time moves by ~1%.
An option wins only when its layers are faster by more than MARGIN and the test_cuda
cases that check it passed in this run.
"""
import re
import sys

MARGIN = 0.03  # fraction of the default's time an option must save to be taken

ROW = re.compile(r"^  (\S.*?)\s+([0-9.]+) ms/step\s+[0-9.]+%\s+\d+ calls$")
STEP_CM_LOSS = re.compile(r"^cmseg GPU .*; cm_loss ([0-9.]+) ms, ")
SUB_RUN = re.compile(r"^(cm_loss (?:prefetch|staged|pairs) kernel|cm_loss grid|instance norm grid|wgrad run depth): (\d+)")

# test_cuda cases each option must have passed in this run (by name; "ok NAME" lines).
REQUIRED_TESTS = {
    "CMSEG_CONV_WGRAD": ["conv3_own_filter_grad_matches_cpu", "conv3_wgrad_paths_match_cpu",
                         "model_step_gpu_own_filter_grad_close_to_cpu"],
    "CMSEG_HEADS_WGRAD": ["heads_concat_ce_predict_match_cpu"],
    "CMSEG_CONCAT_IN_PLACE": ["heads_concat_ce_predict_match_cpu"],
    "CMSEG_CM_LOSS_KERNEL": ["cm_loss_prefetch_kernel_matches_cpu", "cm_loss_staged_kernel_matches_cpu"],
    "CMSEG_IN_BLOCKS_PER_SM": ["instance_norm_matches_cpu"],
}


def stage_blocks(text):
    """{stage name: [runs]}, a run being (sub-run header or None, [lines]). A stage whose
    end marker says it failed is left out: a run cut short lists fewer (or no) rows for
    its layers and would look fast."""
    stages, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^=== stage (\S+)$", line)
        if m:
            name = m.group(1)
            stages[name] = [(None, [])]
            continue
        m = re.match(r"^=== end of stage (\S+): (.*)$", line)
        if m:
            if m.group(1) in stages and m.group(2) != "ok":
                del stages[m.group(1)]
            name = None
            continue
        if name is None:
            continue
        sub = SUB_RUN.match(line)
        if sub:
            runs = stages[name]
            if runs == [(None, [])]:
                runs.clear()
            runs.append(((sub.group(1), int(sub.group(2))), []))
            continue
        stages[name][-1][1].append(line)
    return stages


def layer_ms(lines):
    """{layer row: ms per step}; rows by shape ("... 32->32 128x128x128") left out."""
    rows = {}
    for line in lines:
        m = ROW.match(line)
        if m and not re.search(r"\d->\d", m.group(1)):
            rows[m.group(1)] = float(m.group(2))
    return rows


def metric(lines, names):
    """Sum of the named layer rows (a name ending in '*' matches a prefix); None if none ran."""
    rows = layer_ms(lines)
    picked = [v for k, v in rows.items() for n in names if (k.startswith(n[:-1]) if n.endswith("*") else k == n)]
    return sum(picked) if picked else None


def cm_loss_ms(lines):
    """The CM loss call's device time: its profile row, else the bench's own timing of it."""
    rows = layer_ms(lines)
    if "cm_loss" in rows:
        return rows["cm_loss"]
    for line in lines:
        m = STEP_CM_LOSS.match(line)
        if m:
            return float(m.group(1))
    return None


def passed_tests(text):
    ok = set()
    for line in text.splitlines():
        m = re.match(r"^(?:\d+: )?ok (\S+)$", line.strip())
        if m:
            ok.add(m.group(1))
    return ok


def runs_of(stages, name):
    return stages.get(name, [])


def single(stages, name):
    runs = runs_of(stages, name)
    return runs[0][1] if runs else None


class Chooser:
    def __init__(self, passed):
        self.passed = passed
        self.env = {}
        self.lines = []

    def choose(self, option, label, default_ms, candidates):
        """candidates: [(description, {env}, ms)]; takes the fastest if it saves > MARGIN."""
        if default_ms is None:
            self.lines.append(f"winners: {label}: no default run to compare with; kept the default")
            return None
        timed = [c for c in candidates if c[2] is not None]
        shown = ", ".join(f"{d} {ms:.3f}" for d, _, ms in timed) or "no candidate ran"
        missing = [t for t in REQUIRED_TESTS.get(option, []) if t not in self.passed]
        if not timed:
            self.lines.append(f"winners: {label}: default {default_ms:.3f} ms/step, {shown}; kept the default")
            return None
        best = min(timed, key=lambda c: c[2])
        saved = (default_ms - best[2]) / default_ms if default_ms > 0 else 0.0
        if saved <= MARGIN:
            verdict = f"kept the default (best saves {100 * saved:.1f}%, needs > {100 * MARGIN:.0f}%)"
        elif missing:
            verdict = f"kept the default: {best[0]} saves {100 * saved:.1f}% but test_cuda did not pass {', '.join(missing)}"
        else:
            verdict = f"TAKE {best[0]} (saves {100 * saved:.1f}%): " + " ".join(f"{k}={v}" for k, v in best[1].items())
            self.env.update(best[1])
        self.lines.append(f"winners: {label}: default {default_ms:.3f} ms/step, {shown}; {verdict}")
        return best if verdict.startswith("TAKE") else None


def decide(bench_text, test_text):
    stages = stage_blocks(bench_text)
    c = Chooser(passed_tests(test_text))
    base = single(stages, "bench_gpu")
    if base is None:
        c.lines.append("winners: no default run (stage bench_gpu) in this run; nothing chosen")
        return c

    # conv3's filter gradients: cuDNN (default), own kernel everywhere, per shape.
    # "conv3_backward_filter (own)" is the own kernel's row: both count.
    wgrad = ["conv3_backward_filter*", "conv3: NCDHW<->NDHWC copies"]
    own = single(stages, "bench_gpu_wgrad_own")
    auto = single(stages, "bench_gpu_wgrad_auto")
    took = c.choose("CMSEG_CONV_WGRAD", "conv3 filter gradients + layout copies", metric(base, wgrad), [
        ("own", {"CMSEG_CONV_WGRAD": "own"}, metric(own, wgrad) if own else None),
        ("auto", {"CMSEG_CONV_WGRAD": "auto"}, metric(auto, wgrad) if auto else None),
    ])
    if took and own:
        # The own kernel's run along depth (16 planes unless set), against own at 16.
        runs = [(h, lines) for h, lines in runs_of(stages, "wgrad_run_depth") if h]
        c.choose("CMSEG_CONV_WGRAD", "own filter-gradient kernel's run depth", metric(own, ["conv3_backward_filter*"]), [
            (f"{d} planes", {"CMSEG_WGRAD_RUN_D": str(d)}, metric(lines, ["conv3_backward_filter*"]))
            for (_, d), lines in runs])

    heads = single(stages, "bench_gpu_heads_fused")
    c.choose("CMSEG_HEADS_WGRAD", "1x1 heads backward", metric(base, ["conv1_backward*"]), [
        ("fused", {"CMSEG_HEADS_WGRAD": "fused"}, metric(heads, ["conv1_backward*"]) if heads else None)])

    concat_rows = ["concat_*", "upconv2_*", "add_inplace"]
    cip = single(stages, "bench_gpu_concat_in_place")
    c.choose("CMSEG_CONCAT_IN_PLACE", "concat + upconv2", metric(base, concat_rows), [
        ("in place", {"CMSEG_CONCAT_IN_PLACE": "1"}, metric(cip, concat_rows) if cip else None)])

    cm = []
    for stage, kernel, var, unit in [("cm_loss_prefetch", "prefetch", "CMSEG_CM_LOSS_BLOCKS_PER_SM", "blocks/SM"),
                                     ("cm_loss_staged", "staged", "CMSEG_CM_LOSS_STAGES", "slots")]:
        for header, lines in runs_of(stages, stage):
            if header is None:
                continue
            env = {"CMSEG_CM_LOSS_KERNEL": kernel}
            if header[1]:  # 0: the kernel's own default grid
                env[var] = str(header[1])
            cm.append((f"{kernel} ({header[1] or 'default'} {unit})", env, cm_loss_ms(lines)))
    c.choose("CMSEG_CM_LOSS_KERNEL", "fused CM loss call", cm_loss_ms(base), cm)

    in_rows = ["instance_norm_*"]
    c.choose("CMSEG_IN_BLOCKS_PER_SM", "instance norm passes", metric(base, in_rows), [
        (f"{h[1]} blocks/SM", {"CMSEG_IN_BLOCKS_PER_SM": str(h[1])}, metric(lines, in_rows))
        for h, lines in runs_of(stages, "instance_norm_grid") if h])
    return c


def main(argv):
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    read = lambda p: open(p, encoding="utf-8", errors="replace").read()
    try:
        bench = read(argv[1])
    except OSError as e:
        print(f"winners: cannot read {argv[1]}: {e.strerror}", file=sys.stderr)
        return 1
    try:
        tests = read(argv[2])
    except OSError:
        tests = ""
    c = decide(bench, tests)
    for line in c.lines:
        print(line)
    with open(argv[3], "w", encoding="utf-8") as f:
        for k, v in c.env.items():
            f.write(f"{k}={v}\n")
    print("winners env: " + (" ".join(f"{k}={v}" for k, v in c.env.items()) or "(none: the defaults stand)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
