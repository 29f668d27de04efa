"""
Real data formats in and out: Streamo-Instruct (Streamo's SFT data, raw and stream format), OVO-Bench's
Forward Active Responding and StreamingBench's Proactive Output task, converted to our annotation schema
(SPEC section 1), and StreamingBench's own scoring rule.

    python formats.py --from_streamo raw_data.json --out data/streamo/train.jsonl --video_root /data/streamo
    python formats.py --from_streamo stream_format.json --out data/streamo/train.jsonl --video_root /data/streamo
    python formats.py --from_ovo ovo_bench_new.json --out data/ovo/far.jsonl
    python formats.py --from_streamingbench questions_proactive.json --out data/sb/proactive.jsonl --video_root /data/sb
    python bench.py --ann data/sb/proactive.jsonl --preds PREDS.jsonl --rule streamingbench

Streamo -> ours (ours). Streamo's converter (scripts/convert_streaming_video.py, fps 1) reads every time as
whole seconds (int(), so 5.7 -> 5) and puts a question asked at t on turn t-1, an instant answer at t on
turn t-1, and an interval answer [st, end] as Standby on turns st-1 .. end-1 and the Response on turn end.
Our rule answers on the turn whose end k+1 is the first >= the answer's time and puts Standby from the
turn that contains `start`, so the times become: query_time = t-1, instant time = t, interval
[st-1, end+1]. Then data.build_conversation(states=3) gives Streamo's labels turn by turn, and every
converted sample is checked against them: a sample whose labels would differ is skipped, with the reason.
Streamo also repeats its first question on <0s-1s>; our question appears once, on its own turn, except
when Streamo's labels for it start before that turn (Standby before the question is asked): then it is
asked at 0, where Streamo's repeat shows it. A sample with several questions becomes one sample per
question (ids NAME_q0, NAME_q1, ...); each answer goes to the latest question asked by its Response turn.
The stream format is read back into the same turns (the Standby run before a Response is its interval).
With --video_root a sample whose video is not there is skipped and counted; without it the path is kept and
the video is checked when the file is used, as for any annotation file.

StreamingBench -> ours (ours): one sample per question. Its time stamps are absolute in the video file
(its own protocol cuts the file from time_stamp), so query_time = time_stamp and the answer is an instant
at ground_truth_time_stamp, its text the ground-truth output; `clip` keeps the entry's "[h:mm:ss - h:mm:ss]"
for reference. duration = ground truth + 4 s, where its polling stops. Its model sees the video from
time_stamp on only; ours streams from 0. Task "PO": no SPEC window is +-2 s, so it takes the default one,
[t-3, t+3] with tau 4 (S_time 0.5 at +-2 s, 0.25 at +-3 s).

OVO-Bench Forward Active Responding -> our annotation schema (ours). Task names stay REC / SSR / CRR, so
they get the default window ([t-3, t+3] around the answer's end, tau 4) and fall in no SPB dimension, as
the paper reports OVO FAR apart from SPB; our SFT labels answer an interval at its end, which is what the
default window rewards. query_time 0 for REC and SSR (OVO asks at many times; we ask once, at the start).
  REC  one instant answer per repetition, at its end time, with the running count: text "2",
       slots {"count": 2}, so the offline judge matches the number exactly.
  SSR  one interval answer [start, end] per step, the step's text (free text: the offline judge uses
       word overlap).
  CRR  the question at ask_time, one instant answer (OVO's answer) at clue_time.
Videos keep OVO's relative paths (e.g. COIN/x.mp4), resolved beside the written annotation file.
"""
import argparse
import bisect
import collections
import json
import os
import re

from data import (RESPONSE, SILENCE, STANDBY, TASKS, UserError, answer_end, build_conversation, cli_args,
                  load_annotations, run_cli, split_decision)


class FormatError(UserError):
    pass


class Skip(Exception):
    """A source sample we do not convert: `reason` is the counted category, `detail` the specifics."""

    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def write_annotations(dst, anns):
    """Write converted samples to `dst` (JSONL, whole or not at all), which must pass our own validation."""
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with open(dst + ".tmp", "w", encoding="utf-8") as f:
        for a in anns:
            f.write(json.dumps(a, ensure_ascii=False) + "\n")
    os.replace(dst + ".tmp", dst)
    load_annotations(dst, check_videos=False)
    return anns


# -----------------------------------------------------------------------------
# Reading a large JSON list one item at a time


def iter_json(path, chunk=1 << 20, max_item=1 << 26):
    """The items of a JSON list, or of consecutive JSON values (one object, JSON lines), decoded one at a
    time from a buffered read: a 465K-sample file is never in memory whole, as text or as objects."""
    dec, gap = json.JSONDecoder(), re.compile(r"[\s,]*")
    with open(path, encoding="utf-8") as f:
        buf, pos, offset, eof, top = "", 0, 0, False, True
        while True:
            pos = gap.match(buf, pos).end()
            if top and buf.startswith("[", pos):
                pos, top = pos + 1, False
                continue
            if buf.startswith("]", pos) or (eof and pos == len(buf)):
                return
            try:
                item, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if eof or len(buf) - pos > max_item:  # not an item cut by the buffer's end
                    raise FormatError(f"{path}: not valid JSON at character {offset + e.pos}: {e.msg}") from None
                new = f.read(chunk)
                buf, offset, pos, eof = buf[pos:] + new, offset + pos, 0, not new
                continue
            top = False
            yield item
            pos = end


# -----------------------------------------------------------------------------
# Streamo-Instruct: both formats -> turns -> our samples

STREAMO_DEFAULT_QUESTION = "Find all significant events in the video and describe them."  # its converter's, for a sample without one


def streamo_seconds(x):
    """A Streamo time in whole seconds as its converter reads it at 1 fps: numbers and numeric strings are
    truncated (5.7 -> 5), "mm:ss" and "hh:mm:ss" accepted, None or "" is no time."""
    if x is None or isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return int(x)
    s = str(x).strip()
    if not s:
        return None
    try:
        v = 0.0
        for part in s.split(":") if s.count(":") in (1, 2) else [s]:
            v = v * 60 + float(part)
        return int(v)
    except ValueError:
        raise Skip("unreadable time", repr(x)) from None


def raw_turns(item):
    """A raw sample -> (questions [(turn, text)] in Streamo's order, responses [(first Standby turn or
    None, Response turn, text)]), the turns where Streamo's converter puts them."""
    questions, responses = [], []
    for q in item["question"]:
        t = streamo_seconds(q.get("time"))
        if not isinstance(q.get("content"), str) or not q["content"] or t is None:
            raise Skip("question without text or time", repr(q)[:80])
        questions.append((max(0, t - 1), q["content"]))
    for r in item["response"]:
        if not isinstance(r.get("content"), str) or not r["content"]:
            raise Skip("response without text", repr(r)[:80])
        st, end, t = (streamo_seconds(r.get(k)) for k in ("st_time", "end_time", "time"))
        if st is not None and end is not None:
            first, last = max(0, st - 1), max(0, end - 1)
            responses.append((first if first <= last else None, last + 1, r["content"]))
        elif t is not None:
            responses.append((None, max(0, t - 1), r["content"]))
        else:
            raise Skip("response without a time", repr(r)[:80])
    return questions or [(0, STREAMO_DEFAULT_QUESTION)], responses


def streamo_labels(responses, n):
    """Streamo's assistant message on each of n turns, as its converter writes them: later responses
    overwrite earlier ones, and a Response past the last turn is dropped."""
    out = [SILENCE] * n
    for first, turn, text in responses:
        for k in range(turn if first is None else first, min(turn, n)):
            out[k] = STANDBY
        if turn < n:
            out[turn] = f"{RESPONSE} {text}"
    return out


_USER = re.compile(r"(?s)(?:(.*)\n)?<(\d+)s-(\d+)s>\n<(?:stream|image)>")


def stream_turns(item):
    """A stream-format sample -> (questions, responses, labels) read back from its messages. A question on
    <0s-1s> that is asked again later is Streamo's repeat: the later turn is where it is asked."""
    msgs = [m for m in item["messages"] if m["role"] != "system"]
    users, labels = msgs[0::2], [m["content"].strip() for m in msgs[1::2]]
    if len(users) != len(labels) or any(m["role"] != "user" for m in users) or not users:
        raise Skip("messages are not user/assistant pairs")
    asked = []
    for k, u in enumerate(users):
        m = _USER.fullmatch(u["content"].strip())
        if m is None or (int(m[2]), int(m[3])) != (k, k + 1):
            raise Skip("turns are not <0s-1s>, <1s-2s>, ... (1 fps)", f"turn {k}: {u['content'][-40:]!r}")
        if m[1] and m[1].strip():
            asked.append((k, m[1].strip()))
    if len(asked) > 1 and asked[0][0] == 0 and any(text == asked[0][1] for _, text in asked[1:]):
        again = next(i for i, (_, text) in enumerate(asked) if i and text == asked[0][1])
        asked = [asked[again]] + [a for i, a in enumerate(asked) if i not in (0, again)]  # the repeated one first, as in Streamo's list
    responses, first = [], None
    for k, label in enumerate(labels):
        tok, text = (SILENCE, "") if label == SILENCE else split_decision(label)
        if tok is None:
            raise Skip("assistant turn without a decision token", f"turn {k}: {label[:40]!r}")
        if tok == STANDBY and first is None:
            first = k
        elif tok == RESPONSE:
            responses.append((first, k, text))
            first = None
        elif tok == SILENCE and first is not None:
            raise Skip("Standby not followed by a Response", f"turns {first}-{k - 1}")
    if first is not None:
        raise Skip("Standby not followed by a Response", f"turns {first}-{len(labels) - 1}")
    return asked or [(0, STREAMO_DEFAULT_QUESTION)], responses, labels


def split_questions(questions, responses):
    """One (query turn, question, responses) per question, in Streamo's question order (ours): an answer
    belongs to the latest question asked by its Response turn (to the first one if it comes before them
    all). A question whose answers start before its turn is asked at 0 if Streamo shows it on <0s-1s>
    (its first question, when no question is asked there), else the sample is skipped."""
    order = sorted(range(len(questions)), key=lambda j: questions[j][0])
    turns = [questions[j][0] for j in order]
    if len(set(turns)) < len(turns):
        raise Skip("two questions in one turn", f"turns {turns}")
    own = collections.defaultdict(list)
    for r in responses:
        own[order[max(0, bisect.bisect_right(turns, r[1]) - 1)]].append(r)
    out = []
    for j, (q, text) in enumerate(questions):
        start = min([q] + [r[1] if r[0] is None else r[0] for r in own[j]])
        if start < q:
            if j != 0 or turns[0] == 0:
                raise Skip("answer before its question", f"question {j} on turn {q}, its answer from turn {start}")
            q = 0  # Streamo's repeat shows this question on <0s-1s>: it is asked there
        out.append((q, text, own[j]))
    return out


def to_answer(first, turn, text):
    """Streamo turns -> our times: the Response on turn k is due at k + 1; Standby from turn `first`."""
    return {"time": turn + 1.0, "text": text} if first is None else {"start": float(first), "end": turn + 1.0, "text": text}


def our_labels(samples, n):
    """The assistant message of each turn when the samples' conversations (3-state) are laid over one
    another, as Streamo's one conversation holds all its questions; a turn two samples both use is None."""
    out = [SILENCE] * n
    for s in samples:
        for t in build_conversation(s, n, states=3)["turns"]:
            if t["decision"] != SILENCE:
                out[t["k"]] = t["target"] if out[t["k"]] == SILENCE else None
    return out


def check_labels(ours, theirs):
    """Raise Skip at the first turn where our label (decision token and text) differs from Streamo's."""
    for k, (a, b) in enumerate(zip(ours, theirs)):
        if a != b and (a is None or split_decision(a) != split_decision(b)):  # (equal strings first: most turns are silent)
            mine = "two answers" if a is None else split_decision(a)[0]
            raise Skip(f"labels differ (ours {mine}, Streamo {split_decision(b)[0]})", f"turn {k}")


def video_of(path, root):
    """Our `video`: the source's path as given (resolved beside the annotation file), or under --video_root."""
    if not path:
        raise Skip("no video path")
    if root is None:
        return path
    full = os.path.join(os.path.abspath(root), path)
    if not os.path.isfile(full):
        raise Skip("video not found under --video_root", full)
    return full


def streamo_item(item, index, video_root=None):
    """One Streamo sample (either format) -> our samples, checked against Streamo's labels; raises Skip."""
    if not isinstance(item, dict) or not ("messages" in item or ("question" in item and "response" in item)):
        raise Skip("not a Streamo sample (no messages, no question/response)")
    try:
        if "messages" in item:
            questions, responses, labels = stream_turns(item)
            videos = item.get("videos")
            n, path = len(labels), videos[0] if isinstance(videos, list) and videos else videos
        else:
            questions, responses = raw_turns(item)
            n = 2 + max([q for q, _ in questions] + [r[1] for r in responses])  # the video's length is unknown here
            labels, path = streamo_labels(responses, n), item.get("video_path")
        name = f"{os.path.splitext(os.path.basename(item.get('video_name') or path or 'video'))[0]}_{index}"
        video, task = video_of(path, video_root), str(item.get("task_type") or "streamo")
        if task in TASKS:
            task = "streamo_" + task  # a StreamPro-Bench name would change how it is scored
        extra = {"duration": float(n)} if "messages" in item else {}  # the stream format has one turn per second
        extra.update({k: item[k] for k in ("source",) if item.get(k)})
        samples = [{"id": f"{name}_q{j}", "video": video, "task": task, "question": text, "query_time": float(q),
                    "answers": [to_answer(*r) for r in rs], **extra}
                   for j, (q, text, rs) in enumerate(split_questions(questions, responses))]
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise Skip("malformed sample", f"{type(e).__name__}: {e}") from None
    check_labels(our_labels(samples, n), labels)
    return samples


def from_streamo(src, dst, video_root=None, show=3):
    """Convert a Streamo-Instruct file (raw or stream format, a JSON list or JSON lines) to our JSONL, one
    item at a time. Prints what was written and every skip reason with its count and first samples."""
    skipped, first, n_in, n_out, n_split = collections.Counter(), collections.defaultdict(list), 0, 0, 0
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with open(dst + ".tmp", "w", encoding="utf-8") as f:
        for i, item in enumerate(iter_json(src)):
            n_in += 1
            try:
                samples = streamo_item(item, i, video_root)
                n_split += len(samples) > 1
                for s in samples:
                    f.write(json.dumps(s, ensure_ascii=False) + "\n")
                    n_out += 1
            except Skip as e:
                skipped[e.reason] += 1
                if len(first[e.reason]) < show:
                    name = item.get("video_name", "?") if isinstance(item, dict) else "?"
                    first[e.reason].append(f"#{i} {name}" + (f" ({e.detail})" if e.detail else ""))
    os.replace(dst + ".tmp", dst)
    print(f"{dst}: {n_out} samples from {n_in} Streamo samples of {src} ({n_split} with several questions, split); "
          f"skipped {sum(skipped.values())}")
    for reason, c in skipped.most_common():
        print(f"  skipped {c}: {reason}, e.g. " + "; ".join(first[reason]))
    if not n_out:
        raise FormatError(f"{src}: no sample converted")
    return {"samples": n_out, "sources": n_in, "split": n_split, "skipped": dict(skipped)}


# -----------------------------------------------------------------------------
# OVO-Bench Forward Active Responding -> ours (mapping in the module docstring)


def ovo_to_annotations(items):
    out = []
    for it in items:
        task = it.get("task")
        if task not in ("REC", "SSR", "CRR"):
            continue
        try:
            if task == "REC":
                q = (f"Count how many times this action happens: {it['activity']}. Each time it is completed, "
                     "tell me the count so far.")
                answers = [{"time": float(e), "text": str(k + 1), "slots": {"count": k + 1}}
                           for k, e in enumerate(sorted(it["end_times"]))]
                qt = 0.0
            elif task == "SSR":
                words = "".join(" " + c.lower() if c.isupper() else c for c in it["tutorial"]).strip()
                q = f"I am doing this task: {words}. Each time I finish a step, tell me which step it was."
                if not len(it["all_steps"]) == len(it["start_time"]) == len(it["end_time"]):
                    raise ValueError("all_steps, start_time and end_time differ in length")
                answers = [{"start": float(a), "end": float(b), "text": step}
                           for step, a, b in zip(it["all_steps"], it["start_time"], it["end_time"])]
                qt = 0.0
            else:
                q, qt = it["question"], float(it["ask_time"])
                answers = [{"time": float(it["clue_time"]), "text": it["answer"]}]
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"OVO item id {it.get('id')} ({task}): {type(e).__name__}: {e}") from None
        out.append({"id": f"ovo_{task}_{it['id']}", "video": it["video"], "task": task, "question": q,
                    "query_time": qt, "answers": answers})
    return out


def read_list(src, what):
    """A source file that must hold a JSON list of objects (OVO-Bench's and StreamingBench's are small)."""
    with open(src, encoding="utf-8") as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            raise FormatError(f"{src}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): expected {what}") from None
    if not isinstance(items, list) or not all(isinstance(it, dict) for it in items):
        raise FormatError(f"{src}: expected {what}, a JSON list of objects; got {type(items).__name__}"
                          + (" holding other values" if isinstance(items, list) else ""))
    return items


def from_ovo(src, dst):
    items = read_list(src, "OVO-Bench's items (ovo_bench_new.json)")
    anns = write_annotations(dst, ovo_to_annotations(items))
    counts = collections.Counter(a["task"] for a in anns)
    print(f"{dst}: " + ", ".join(f"{t} {counts[t]}" for t in ("REC", "SSR", "CRR")) + f" ({len(anns)} samples)")
    return counts


# -----------------------------------------------------------------------------
# StreamingBench Proactive Output -> ours, and its own scoring rule

SB_TASK = "PO"  # not a StreamPro-Bench task: the default window [t-3, t+3], tau 4 (module docstring)


def hms(text):
    """'0:02:54' or '00:02:54' -> 174.0 seconds."""
    v = 0.0
    for part in text.strip().split(":"):
        v = v * 60 + float(part)
    return v


def streamingbench_to_annotations(items, video_root=None):
    """StreamingBench's questions_proactive.json entries -> our samples, one per question (mapping in the
    module docstring). Keeps every question: a missing video is reported when the annotations are used."""
    out = []
    for i, it in enumerate(items):
        try:
            clip = [hms(t) for t in it["time"].strip().strip("[]").split(" - ")]
            video = os.path.normpath(it["video_path"])  # "./videos/x.mp4" -> "videos/x.mp4"
            video = video if video_root is None else os.path.join(os.path.abspath(video_root), video)
            for j, q in enumerate(it["questions"]):
                t, gt, want = hms(q["time_stamp"]), hms(q["ground_truth_time_stamp"]), q["ground_truth_output"]
                out.append({"id": f"sbpo{i:03d}_q{j}", "video": video, "task": SB_TASK, "question": q["question"],
                            "query_time": t, "answers": [{"time": gt, "text": want, "slots": {"output": want}}],
                            "duration": max(t, gt) + 4.0, "clip": clip, "category": it.get("video_categories")})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"StreamingBench entry {i} ({it.get('video_path') if isinstance(it, dict) else it!r:.40}): "
                              f"{type(e).__name__}: {e}") from None
    return out


def from_streamingbench(src, dst, video_root=None):
    items = read_list(src, "StreamingBench's entries (questions_proactive.json)")  # 250 questions: small enough to load
    anns = write_annotations(dst, streamingbench_to_annotations(items, video_root))
    print(f"{dst}: {len(anns)} samples (one per question) from {src}")
    return len(anns)


def streamingbench_rule(sample, responses, eps=1e-9):
    """StreamingBench's Proactive Output rule (its src/data/count.py) for one sample: the reply is the first
    response at or after the question; it is on time when -2 <= t - t_gt <= 2, and correct when it is also on
    time and the ground-truth output is a substring of it, exact and case-sensitive as there. Polling stops
    at t_gt + 4, so a later first reply counts as none: it is late either way."""
    if len(sample["answers"]) != 1:
        raise FormatError(f"sample {sample['id']}: the StreamingBench rule needs exactly one answer, got {len(sample['answers'])}")
    gt = sample["answers"][0]
    after = [r for r in responses if r["time"] >= sample["query_time"] - eps]
    reply = min(after, key=lambda r: r["time"]) if after else None
    on_time = reply is not None and -2 - eps <= reply["time"] - answer_end(gt) <= 2 + eps
    return {"on_time": on_time, "correct": on_time and gt["text"] in reply["text"]}


def streamingbench_scores(samples, preds):
    """Time accuracy and answer accuracy over all samples (a sample missing from preds never replies)."""
    rows = [streamingbench_rule(s, preds.get(s["id"], [])) for s in samples]
    n = len(rows)
    return {"n": n, "time_accuracy": sum(r["on_time"] for r in rows) / n if n else 0.0,
            "answer_accuracy": sum(r["correct"] for r in rows) / n if n else 0.0}


def format_streamingbench(sc):
    return (f"StreamingBench rule (first reply after the question, on time within +-2 s, output as a substring): "
            f"n {sc['n']}, time accuracy {100 * sc['time_accuracy']:.1f}, answer accuracy {100 * sc['answer_accuracy']:.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from_streamo", metavar="FILE", help="Streamo-Instruct, raw or stream format")
    g.add_argument("--from_ovo", metavar="OVO.json", help="OVO-Bench FAR items (REC/SSR/CRR)")
    g.add_argument("--from_streamingbench", metavar="SB.json", help="StreamingBench's questions_proactive.json")
    p.add_argument("--out", required=True, help="the annotation JSONL to write")
    p.add_argument("--video_root", help="the folder the source's video paths are relative to (Streamo: samples whose "
                   "video is not there are skipped and counted)")
    a = p.parse_args(cli_args(argv))
    for flag in ("from_streamo", "from_ovo", "from_streamingbench"):
        if getattr(a, flag) and not os.path.isfile(getattr(a, flag)):
            raise FormatError(f"--{flag} {getattr(a, flag)}: file not found")
    if a.from_streamo and a.video_root and not os.path.isdir(a.video_root):  # (else every sample is skipped, after a long read)
        raise FormatError(f"--video_root {a.video_root}: no such folder")
    if a.from_streamo:
        return from_streamo(a.from_streamo, a.out, a.video_root)
    if a.from_ovo:
        return from_ovo(a.from_ovo, a.out)
    return from_streamingbench(a.from_streamingbench, a.out, a.video_root)


if __name__ == "__main__":
    run_cli(main)
