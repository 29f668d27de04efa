"""
Score streaming predictions with StreamPro-F1 (SPEC section 3) and print the paper's table.

    python synthetic.py                                # first: writes data/synthetic/ (the default --ann)
    python bench.py --baseline oracle                  # model-free baselines: oracle (F1 100), silent, every-turn, random
    python bench.py --ann data/synthetic/test.jsonl --preds out/preds.jsonl
    python bench.py --preds out/preds.jsonl --judge http --judge_url http://localhost:8000/v1 --judge_model NAME
    python bench.py --preds out/preds.jsonl --show v12_q0          # one sample as a text timeline
    python bench.py --ann data/sb/proactive.jsonl --baseline oracle --rule streamingbench  # + its own rule
    python bench.py --time_scoring 10000               # how fast the metric is with the offline judge
    python bench.py --model out/sft-cb                 # stream a checkpoint over --ann (infer.py, resumable), then score
    python bench.py                                    # the latest default checkpoint (out/grpo, out/sft-cb, out/seed0/...)

Predictions are JSONL, one {"id": ..., "responses": [{"time": seconds, "text": "..."}]} per sample, the
decision token stripped; a sample missing from the file counts as silent. Results go to PREDS.results.json.
The default judge is offline (normalised slot match for structured answers, word overlap for free text):
it is NOT the paper's LLM judge; use --judge http for numbers comparable with the paper.
"""
import argparse
import collections
import json
import math
import os
import random
import time

import numpy as np
from tqdm import tqdm

import formats
from data import INTERVAL_TASKS, TASKS, UserError, answer_end, check_flags, cli_args, load_annotations, run_cli
from metric import HTTPJudge, OfflineJudge, aggregate, roc_auc, score_sample

DEFAULT_ANN = "data/synthetic/test.jsonl"
# what `python bench.py` scores, the first that exists: `python grpo.py` / `python sft.py` outputs, then pipeline.sh's
DEFAULT_MODELS = ("out/grpo", "out/sft-cb", "out/seed0/grpo", "out/seed0/sft-cb")


class BenchError(UserError):
    pass


# -----------------------------------------------------------------------------
# Predictions: read a file, or make a model-free baseline


def load_preds(path, samples):
    """{id: responses}. Malformed lines and ids not in the annotations are errors naming file and line."""
    if not os.path.isfile(path):
        raise BenchError(f"{path}: predictions file not found")
    known, preds = {s["id"] for s in samples}, {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                e = json.loads(line)
            except json.JSONDecodeError as err:
                raise BenchError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(e, dict) or "id" not in e or not isinstance(e.get("responses"), list):
                raise BenchError(f'{where}: expected {{"id": ..., "responses": [{{"time", "text"}}, ...]}}')
            if e["id"] not in known:
                raise BenchError(f"{where}: id {e['id']!r} is not in the annotations")
            if e["id"] in preds:
                raise BenchError(f"{where}: id {e['id']!r} appears twice")
            for k, r in enumerate(e["responses"]):
                t = r.get("time") if isinstance(r, dict) else None
                if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)) or \
                        not isinstance(r.get("text"), str):
                    raise BenchError(f"{where}: responses[{k}] needs a number 'time' and a string 'text', got {r!r:.80}")
            preds[e["id"]] = e["responses"]
    return preds


def write_preds(path, preds):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for sid, responses in preds.items():
            f.write(json.dumps({"id": sid, "responses": responses}) + "\n")


def _turn_times(s, kind):
    """Decision times t_k = k + 1 of the turns from the question's to the last one (1 fps)."""
    if "duration" not in s:
        raise BenchError(f"sample {s['id']}: the {kind} baseline needs 'duration' in the annotations")
    return [k + 1.0 for k in range(math.floor(s["query_time"]), math.ceil(s["duration"] - 1e-9))]


def baseline_preds(samples, kind, p=0.1, seed=0):
    """oracle: every answer once at its optimal time with its own text (an interval task answers at the end,
    TG with "from {start}s to {end}s"); silent: nothing; every-turn: the first reference text at every turn;
    random: a random reference text of the sample at each turn with probability p. (ours) A sample without
    answers gets no responses from any baseline."""
    rng, out = random.Random(seed), {}
    for s in samples:
        texts, rs = [a["text"] for a in s["answers"]], []
        if kind == "oracle":
            for a in s["answers"]:
                tg = s["task"] == "TG" and "start" in a
                rs.append({"time": answer_end(a), "text": f"from {a['start']:g}s to {a['end']:g}s" if tg else a["text"]})
        elif kind == "every-turn" and texts:
            rs = [{"time": t, "text": texts[0]} for t in _turn_times(s, kind)]
        elif kind == "random" and texts:
            rs = [{"time": t, "text": rng.choice(texts)} for t in _turn_times(s, kind) if rng.random() < p]
        out[s["id"]] = rs
    return out


# -----------------------------------------------------------------------------
# Scoring and the table


def make_judge(args, samples):
    if args.judge == "offline":
        return OfflineJudge.from_samples(samples)
    if not (args.judge_url and args.judge_model):
        raise BenchError("--judge http needs --judge_url and --judge_model")
    return HTTPJudge(args.judge_url, args.judge_model, args.api_key_env, args.judge_cache,
                     concurrency=args.judge_concurrency)


def evaluate(samples, preds, judge):
    """score_sample for every sample (missing ids = silent) -> (rows, aggregate). An HTTP judge first gets
    every question it will be asked in one concurrent batch."""
    if hasattr(judge, "prefetch"):
        asked = []
        for s in samples:  # a dry run that only records the judge calls, so nothing is matched twice by hand
            score_sample(s, preds.get(s["id"], []), lambda q, p, a: asked.append((q, p, a)) or 0.0)
        judge.prefetch(asked)
    rows = [score_sample(s, preds.get(s["id"], []), judge) for s in tqdm(samples, desc="score", disable=len(samples) < 1000)]
    return rows, aggregate(rows)


def decision_scores(samples, path):
    """p(</Response>) at every decision from each question on (infer.py writes `p_response` per turn)
    and whether the turn's label is a response."""
    from data import RESPONSE, build_conversation
    probs = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("p_response"):
                probs[r["id"]] = r["p_response"]
    scores, labels = [], []
    for s in samples:
        if s["id"] in probs:
            conv = build_conversation(s, len(probs[s["id"]]))
            scores += probs[s["id"]][conv["q_turn"]:]
            labels += [t["decision"] == RESPONSE for t in conv["turns"][conv["q_turn"]:]]
    return scores, labels


def best_threshold(scores, labels):
    """The threshold on p(</Response>) that maximises turn-level F1 of (p >= threshold) against the
    labels (the calibration control: CE with its operating point tuned on the val split)."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    f1 = 2 * np.cumsum(y) / (np.arange(1, len(s) + 1) + y.sum())  # top-k predicted: F1 = 2 TP / (k + positives)
    f1[:-1][s[1:] == s[:-1]] = -1  # a threshold takes all tied scores or none
    return float(s[int(np.argmax(f1))])


RUNS = [("CE", "sft-ce", False), ("CE, threshold tuned on val", "sft-ce", True), ("focal (Streamo)", "sft-focal", False),
        ("CB-Stream", "sft-cb", False), ("CB-Stream + GRPO", "grpo", False),
        ("CB-Stream + SFT on GRPO's videos (control)", "control", False)]


def run_values(res):
    """The numbers the tables show for one results.json: dimension F1s, Avg, W-Avg, per level W-Avg, the level-2
    tasks' F1 (the seven SPB tasks; levels 0-1 are OU too, so the task rows of the whole file mix levels),
    response rate, and the ROC-AUC of p(</Response>) over all, over levels 0-1 and per level-2 task."""
    sm = res["summary"]
    lv = {int(k): m for k, m in sm.get("levels", {}).items()}  # JSON keys are strings
    l2 = lv.get(2, sm)  # files without levels: their own tasks
    out = {"PU": sm["dims"].get("PU", {}).get("f1"), "TR": sm["dims"].get("TR", {}).get("f1"),
           "PA": sm["dims"].get("PA", {}).get("f1"), "Avg": sm["avg"], "W-Avg": sm["w_avg"],
           "resp. rate": sm["response_rate"], "AUC": sm.get("auc"), "AUC L0–1": sm.get("auc_levels_01")}
    out.update({f"L{k}": lv[k]["w_avg"] for k in lv})
    for t in TASKS:
        out[t] = l2["tasks"][t]["f1"] if t in l2["tasks"] else None
        out[f"AUC {t}"] = l2.get("task_auc", {}).get(t)
    return out


def results_table(run_dirs, stem="test"):
    """Markdown tables over runs (one directory per seed, each with sft-ce, sft-focal, sft-cb, grpo, control
    scored by `bench.py --model`), mean ± sample std over seeds: the headline (with each seed's Avg: the
    seeds can differ in kind, not only in degree), the level-2 tasks' F1, the ROC-AUC per task; then the
    model-free baselines."""
    import glob
    found = {}
    for name, sub, tuned in RUNS:
        pat = f"preds-{stem}-t*.results.json" if tuned else f"preds-{stem}.results.json"
        files = [sorted(glob.glob(os.path.join(d, sub, pat)))[-1:] for d in run_dirs]
        found[name] = [run_values(json.load(open(f[0]))) for f in files if f]
    base = {b: run_values(json.load(open(p))) for b in ("oracle", "silent", "every-turn", "random")
            if os.path.isfile(p := os.path.join("out", "bench", f"{stem}.{b}.preds.results.json"))}

    def cell(xs, col):
        xs = [x for x in xs if x is not None]
        if not xs:
            return "-"
        prob = col.startswith("AUC") or col == "resp. rate"  # shown as is; F1s x 100
        fmt, m = ("{:.3f}", 1) if prob else ("{:.1f}", 100)
        return fmt.format(np.mean(xs) * m) + (" ± " + fmt.format(np.std(xs, ddof=1) * m) if len(xs) > 1 else "")

    def table(cols, per_seed=None, baselines=True):
        extra = [f"{per_seed} per seed"] if per_seed else []
        lines = ["| model | " + " | ".join(cols + extra) + " |", "|---" * (len(cols) + len(extra) + 1) + "|"]
        for name, vals in found.items():
            if vals:
                seeds = [" / ".join("-" if v[per_seed] is None else f"{100 * v[per_seed]:.1f}" for v in vals)] if per_seed else []
                lines.append(f"| {name} | " + " | ".join([cell([v.get(c) for v in vals], c) for c in cols] + seeds) + " |")
        for b, v in base.items() if baselines else ():
            lines.append(f"| baseline: {b} | " + " | ".join([cell([v.get(c)], c) for c in cols] + [""] * len(extra)) + " |")
        return "\n".join(lines)

    return "\n\n".join([table(["PU", "TR", "PA", "Avg", "W-Avg", "L0", "L1", "L2", "resp. rate", "AUC L0–1"], "Avg"),
                         "F1 x 100 of the level-2 tasks (the seven StreamPro-Bench tasks):\n\n" + table(list(TASKS)),
                         "ROC-AUC of p(</Response>) per task (0.5: chance):\n\n"
                         + table(["AUC L0–1"] + [f"AUC {t}" for t in TASKS], baselines=False)])


def by_level(samples, rows):
    """Aggregate per synthetic difficulty level, when the annotations carry levels."""
    level = {s["id"]: s.get("level") for s in samples}
    groups = collections.defaultdict(list)
    for r in rows:
        groups[level.get(r["id"])].append(r)
    return {lv: aggregate(rs) for lv, rs in sorted(groups.items()) if lv is not None} if len(groups) > 1 else {}


def format_table(summary, missing=0):
    """The paper's table. Samples without predictions (scored as silent) are counted on the score line itself:
    a zero there may be a video that never streamed, not a model that never spoke."""
    pct = lambda v: " " * 5 + "-" if v is None else f"{100 * v:6.1f}"
    auc = lambda v: f"{v:7.3f}" if v is not None else ""
    head = f"{'':6}{'n':>6}{'Time':>7}{'Acc':>7}{'Prec':>7}{'Rec':>7}{'F1':>7}" + (f"{'AUC':>7}" if "task_auc" in summary else "")
    line = lambda name, m: f"{name:6}{m['n']:6d}" + "".join(pct(m[c]) for c in ("time", "acc", "precision", "recall", "f1"))
    out = [head] + [line(t, m) + auc(summary.get("task_auc", {}).get(t)) for t, m in summary["tasks"].items()]
    if summary["dims"]:
        out += ["-" * len(head)] + [line(d, m) for d, m in summary["dims"].items()]
    silent = f"   ({missing} of {summary['n']} samples have no predictions: scored as silent)" if missing else ""
    out += ["-" * len(head), f"Overall Avg {pct(summary['avg']).strip()}   W-Avg {pct(summary['w_avg']).strip()}{silent}"
            "   (Avg: mean of the dimension F1s present; W-Avg: mean over samples)"]
    for lv, m in summary.get("levels", {}).items():
        out.append(f"level {lv}: n {m['n']}, W-Avg {pct(m['w_avg']).strip()}, Avg {pct(m['avg']).strip()}, "
                   f"response rate {m['response_rate']:.3f}" if m["response_rate"] is not None else "")
    if summary.get("auc") is not None:
        out.append(f"ROC-AUC of p(</Response>) at the decisions from the question on: {summary['auc']:.3f}")
    rr = summary["response_rate"]
    out.append(f"samples {summary['n']} ({missing} missing from the predictions, scored as silent); "
               f"responses {summary['n_responses']}" + (f", response rate {rr:.3f} ({summary['n_turns']} turns "
                                                        "from the questions on)" if rr is not None else ""))
    for lv, m in summary.get("levels", {}).items():
        if len(m.get("task_auc", {})) > 1:
            out.append(f"level {lv} per task, F1 / ROC-AUC: " + ", ".join(
                f"{t} {100 * m['tasks'][t]['f1']:.1f} / " + ("-" if a is None else f"{a:.2f}") for t, a in m["task_auc"].items()))
    return "\n".join(out)


def timeline(sample, responses, row):
    """One sample as text: each GT's t_opt and window, one row per second with a column per GT
    ('*' t_opt, '=' window, '.' outside), predictions on their second with S_time, S_acc and their GT."""
    m_, qt = row["matches"], sample["query_time"]
    out = [f"{sample['id']}  task {sample['task']}  question at {qt:g}s: {sample['question']}"]
    for i, (g, m) in enumerate(zip(sample["answers"], m_)):
        (a, b), (lo, hi) = m["optimal"], m["window"]
        best = (f"best P{m['match']}: S {m['s']:.2f} = S_time {m['s_time']:.2f} x S_acc {m['s_acc']:.2f}"
                if m["match"] is not None else "no match")
        opt = f"{a:g}s" if a == b else f"[{a:g}, {b:g}]s"
        out.append(f"  G{i}: t_opt {opt}  window [{lo:g}, {hi:g}]s  {best}  \"{g['text']}\"")
    out.append(f"  P {row['precision']:.3f}  R {row['recall']:.3f}  F1 {row['f1']:.3f}  "
               f"({row['n_pred']} predictions, {row['n_gt']} answers)")
    by_sec = collections.defaultdict(list)
    for p in row["preds"]:
        by_sec[math.floor(p["time"])].append(p)
    end = max([sample.get("duration", 0.0), qt] + [m["window"][1] for m in m_] + [r["time"] for r in responses])
    out.append("     t  " + "".join(f"G{i:<3d}" for i in range(len(m_))) + "| predictions     (* t_opt  = window  . outside)")
    skipped = 0
    for k in range(0, math.ceil(end) + 1):
        cells = ["*" if m["optimal"][0] < k + 1 and m["optimal"][1] >= k else
                 "=" if m["window"][0] < k + 1 and m["window"][1] >= k else "." for m in m_]
        notes = [f"P{p['index']} at {p['time']:g}s " + (f"-> G{p['gt']}  S_time {p['s_time']:.2f}  S_acc {p['s_acc']:.2f}"
                 if p["gt"] is not None else "-> no window (unmatched)") + f"  \"{responses[p['index']]['text']}\""
                 for p in by_sec.get(k, [])]
        if k == math.floor(qt):
            notes.insert(0, "<- question")
        if all(c == "." for c in cells) and not notes:
            skipped += 1
            continue
        if skipped:
            out.append(f"     :  ({skipped}s with nothing)")
            skipped = 0
        grid = "".join(f"{c:4}" for c in cells)
        for n, note in enumerate(notes or [""]):
            out.append(((f"{k:6d}  {grid}" if n == 0 else " " * 8 + " " * len(grid)) + f"| {note}").rstrip())
    return "\n".join(out)


# -----------------------------------------------------------------------------
# Speed check: random samples in memory, offline judge


def random_samples(n, seed=0):
    """n samples of the seven tasks with ~3 slot answers and ~4 responses each (some near the answers)."""
    rng = random.Random(seed)
    colours, shapes = ["red", "green", "blue", "yellow", "dark red", "light blue"], ["square", "circle", "triangle", "top-left star"]
    samples, preds = [], {}
    for k in range(n):
        task, t, answers = rng.choice(TASKS), 2.0, []
        for _ in range(rng.randint(2, 4)):
            t += rng.randint(3, 12)
            slots = {"colour": rng.choice(colours), "shape": rng.choice(shapes)}
            a = {"text": f"The {slots['shape']} turned {slots['colour']}.", "slots": slots}
            a.update({"start": t - 3, "end": t} if task in INTERVAL_TASKS or task == "TG" else {"time": t})
            answers.append(a)
        rs = []
        for _ in range(rng.randint(2, 6)):
            a = rng.choice(answers)
            text = (f"from {a['start'] + rng.randint(-2, 2)}s to {a['end']}s" if task == "TG" else
                    f"The {rng.choice(shapes)} is now {rng.choice(colours)}." if rng.random() < 0.5 else a["text"])
            rs.append({"time": answer_end(a) + rng.uniform(-5, 5), "text": text})
        samples.append({"id": f"s{k}", "task": task, "question": "Tell me when a shape changes colour.",
                        "query_time": 0.0, "answers": answers, "duration": t + 5})
        preds[f"s{k}"] = rs
    return samples, preds


def time_scoring(n, seed=0):
    samples, preds = random_samples(n, seed)
    judge = OfflineJudge.from_samples(samples)
    t0 = time.perf_counter()
    rows = [score_sample(s, preds[s["id"]], judge) for s in samples]
    summary = aggregate(rows)
    dt = time.perf_counter() - t0
    print(f"scored {n} samples ({sum(r['n_gt'] for r in rows)} answers, {sum(r['n_pred'] for r in rows)} "
          f"predictions) with the offline judge in {dt:.3f} s (W-Avg F1 {100 * summary['w_avg']:.1f})")
    return dt


# -----------------------------------------------------------------------------


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="StreamPro-F1 benchmark (SPEC section 3).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    # what to score
    ap.add_argument("--ann", help=f"annotation JSONL (default {DEFAULT_ANN}: run `python synthetic.py` first)")
    ap.add_argument("--preds", help='predictions JSONL: {"id", "responses": [{"time", "text"}]} per line')
    ap.add_argument("--baseline", choices=["oracle", "silent", "every-turn", "random"], help="model-free predictions")
    ap.add_argument("--p", type=float, default=0.1, help="random baseline: response probability per turn")
    ap.add_argument("--seed", type=int, default=0, help="random baseline / --time_scoring seed")
    ap.add_argument("--out", help="baseline: its predictions file (default out/bench/<ann>.<baseline>.preds.jsonl)")
    ap.add_argument("--model", help="checkpoint to stream over --ann first (infer.py; predictions beside it, resumable)")
    ap.add_argument("--threshold", type=float, default=None, help="--model: respond when p(</Response>) >= this")
    ap.add_argument("--streams", type=int, default=8, help="--model: streams decoded together")
    ap.add_argument("--states", type=int, default=2, choices=[2, 3], help="--model: the format it was trained with")
    ap.add_argument("--allow_failed", action="store_true", help="--model: score even when some samples failed to stream "
                    "(scored as silent, said on the score line); without it such a run is an error")
    ap.add_argument("--calibrate", metavar="VAL.jsonl", help="--model: first pick the threshold that maximises turn-level "
                    "F1 of p(</Response>) on this split, then stream --ann with it")
    ap.add_argument("--table", nargs="+", metavar="RUN_DIR", help="print the results table of runs (one dir per seed)")
    # the judge that gives S_acc
    ap.add_argument("--judge", choices=["offline", "http"], default="offline",
                    help="offline: slot match / word overlap, NOT the paper's LLM judge; http: an LLM judge")
    ap.add_argument("--judge_url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    ap.add_argument("--judge_model", help="model name sent to the endpoint")
    ap.add_argument("--api_key_env", default="OPENAI_API_KEY", help="env var holding the API key (may be unset)")
    ap.add_argument("--judge_cache", default="out/bench/judge_cache.jsonl", help="JSONL cache of judge replies")
    ap.add_argument("--judge_concurrency", type=int, default=8)
    # tools
    ap.add_argument("--show", metavar="ID", help="print one sample as a timeline instead of the table")
    ap.add_argument("--rule", choices=["f1", "streamingbench"], default="f1", help="streamingbench: also score with "
                    "StreamingBench's proactive rule (time and answer accuracy, formats.streamingbench_rule)")
    ap.add_argument("--time_scoring", type=int, metavar="N", help="time the metric on N random samples")
    return ap.parse_args(cli_args(argv))


def check_args(args):
    """Flags that cannot work, named before anything is read or streamed."""
    check_flags(args, positive=("streams", "judge_concurrency", "time_scoring"), fractions=("p", "threshold"))
    if args.judge == "http" and not (args.judge_url and args.judge_model):
        raise BenchError("--judge http needs --judge_url and --judge_model")
    for d in args.table or []:  # (a wrong run folder would otherwise give a table of baselines alone)
        if not os.path.isdir(d):
            raise BenchError(f"--table {d}: no such run folder")
    for flag in ("ann", "calibrate"):
        if getattr(args, flag) and not os.path.isfile(getattr(args, flag)):
            raise BenchError(f"--{flag} {getattr(args, flag)}: annotation file not found")
    if args.model:
        import model as M
        M.check_model(args.model)


def predictions(args, ann, samples):
    """The predictions file to score: a baseline's, the one given, or a checkpoint streamed over `ann`
    (infer.py; after --calibrate has picked its threshold on a validation split)."""
    if args.baseline:
        stem = os.path.splitext(os.path.basename(ann))[0]
        path = args.out or os.path.join("out", "bench", f"{stem}.{args.baseline}.preds.jsonl")
        write_preds(path, baseline_preds(samples, args.baseline, args.p, args.seed))
        return path
    if args.preds and not args.model:
        return args.preds
    model = args.model or next((m for m in DEFAULT_MODELS if os.path.isfile(os.path.join(m, "config.json"))), None)
    if model is None:
        raise BenchError("no checkpoint to benchmark: run `python sft.py` (then `python grpo.py`) first, "
                         "or give --model CKPT, --preds PREDS.jsonl or --baseline NAME")
    import infer
    common = ["--model", model, "--streams", str(args.streams), "--states", str(args.states)] + (["--allow_failed"] if args.allow_failed else [])
    if args.calibrate:
        val_preds = os.path.join(model, f"preds-{os.path.splitext(os.path.basename(args.calibrate))[0]}.jsonl")
        infer.predict_file(infer.get_args(common + ["--ann", args.calibrate, "--out", val_preds]))
        args.threshold = round(best_threshold(*decision_scores(load_annotations(args.calibrate, check_videos=False), val_preds)), 4)
        print(f"threshold {args.threshold:g}: the best turn-level F1 of p(</Response>) >= threshold on {args.calibrate}")
    stem = os.path.splitext(os.path.basename(ann))[0] + ("" if args.threshold is None else f"-t{args.threshold:g}")
    path = args.preds or os.path.join(model, f"preds-{stem}.jsonl")
    if os.path.exists(results_path(path)):  # an earlier run's scores would outlive a stream that fails now
        os.remove(results_path(path))
    iargs = common + ["--ann", ann, "--out", path]
    infer.predict_file(infer.get_args(iargs + (["--threshold", str(args.threshold)] if args.threshold is not None else [])))
    return path


def results_path(preds_path):
    return (preds_path[:-len(".jsonl")] if preds_path.endswith(".jsonl") else preds_path) + ".results.json"


def score(samples, preds, preds_path, judge):
    """Per-sample rows and the summary: the paper's table, the ROC-AUC of p(</Response>) over turns, per level."""
    rows, summary = evaluate(samples, preds, judge)
    scores, labels = decision_scores(samples, preds_path)
    summary["auc"] = roc_auc(scores, labels) if scores else None
    summary["levels"] = by_level(samples, rows)
    auc_of = lambda ss: (lambda v: None if np.isnan(v) else v)(roc_auc(*decision_scores(ss, preds_path)))  # null, not NaN, in JSON
    for lv, m in summary["levels"].items():  # each level's own ROC-AUC and its tasks', and levels 0-1's together
        m["auc"] = auc_of([s for s in samples if s.get("level") == lv])
        m["task_auc"] = {t: auc_of([s for s in samples if s.get("level") == lv and s["task"] == t]) for t in m["tasks"]}
    summary["task_auc"] = {t: auc_of([s for s in samples if s["task"] == t]) for t in summary["tasks"]}
    if summary["levels"]:
        summary["auc_levels_01"] = auc_of([s for s in samples if s.get("level") in (0, 1)])
    return rows, summary


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    if args.time_scoring:
        return time_scoring(args.time_scoring, args.seed)
    if args.table:
        text = results_table(args.table, os.path.splitext(os.path.basename(args.ann or DEFAULT_ANN))[0])
        print(text)
        return text
    ann = args.ann or DEFAULT_ANN
    if not os.path.isfile(ann) and not args.ann:
        raise BenchError(f"{ann} not found: run `python synthetic.py` first, or pass --ann")
    samples = load_annotations(ann, check_videos=False)
    if args.show and args.show not in {s["id"] for s in samples}:  # (before a model streams the whole file)
        raise BenchError(f"{ann}: no sample with id {args.show!r}")
    preds_path = predictions(args, ann, samples)
    preds = load_preds(preds_path, samples)
    judge = make_judge(args, samples)

    if args.show:
        s = next(s for s in samples if s["id"] == args.show)
        responses = preds.get(s["id"], [])
        text = timeline(s, responses, score_sample(s, responses, judge))
        print(text)
        return text

    rows, summary = score(samples, preds, preds_path, judge)
    missing = sum(s["id"] not in preds for s in samples)
    judge_name = "offline (slot match / word overlap, not the paper's LLM judge)" if args.judge == "offline" \
        else f"http {args.judge_model} at {args.judge_url}"
    print(f"StreamPro-F1 of {preds_path} on {ann}, judge: {judge_name}")
    print(format_table(summary, missing))
    results = {"ann": ann, "preds": preds_path, "judge": judge_name, "missing": missing, "summary": summary, "rows": rows}
    if args.rule == "streamingbench":
        results["streamingbench"] = formats.streamingbench_scores(samples, preds)
        print(formats.format_streamingbench(results["streamingbench"]))
    out = results_path(preds_path)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    run_cli(main)
