"""
The synthetic proactive benchmark: real H.264 mp4 files of coloured shapes on a small canvas (84 px), with
questions and timed answers whose ground truth is known exactly, covering the seven StreamPro-Bench
tasks. It is the default data of every script, so the whole pipeline runs offline on a CPU.

    python synthetic.py                                  # default sizes, into data/synthetic
    python synthetic.py --out data/synthetic --n_train 1200 --levels 0,1,2 --seed 0

Difficulty levels (measured with the tiny models, see STUDY.md):
  0  one square changes colour at random times; "tell me when the square turns red"        (OU)
  1  question-conditioned: "tell me when the square turns {colour}"; changes to other colours and
     the colour changes of other shapes are distractors                                      (OU)
  2  the seven tasks EU OU AA TP TG GP RF with 1-3 shapes that move, change and vanish

Time convention (ours): scene changes happen at whole seconds e (frames at t >= e show them). At 1 fps
the first frame that shows the change is frame e, so the earliest a streaming model can answer is
the end of turn e, t = e + 1. All annotation times are these decision times (physical time + 1 s),
so SPEC's label rule (answer in the first turn with t_k >= t) puts every answer in the turn whose
frame shows the evidence, and a perfect model scores S_time = 1. Event times are random with no
fixed spacing: a model cannot time its answers from the rhythm of its own previous answers.
"""
import argparse
import json
import os
import time
from multiprocessing import Pool

import numpy as np

from data import DEFAULT_DATA, SYSTEM_PROMPT, SYSTEM_PROMPT_3, UserError, check_flags, cli_args, run_cli, time_marker

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
SHAPES = ("square", "circle", "triangle")
DIRS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PLACES = {"top left": (0, 0), "top right": (2, 0), "bottom left": (0, 2), "bottom right": (2, 2), "centre": (1, 1)}
BACKGROUND = (40, 40, 40)
# (ours) Frames are 84 px: the ViT's merged visual token covers 28 x 28 px, so an 84-px frame is 3 x 3 tokens, one
# per cell of the 3 x 3 grid the shapes live on. At 56 px (2 x 2 tokens for 9 cells) the tiny model's per-task
# ROC-AUC on the move tasks stayed near chance (EU 0.62, TP 0.57, TG 0.47); at 84 px it was 0.98, 0.95, 0.93
# (STUDY.md: the paper's protocol at toy scale).
SIZE = 84
# (ours) Answers of one sample are due at least 4 s apart (moves end 4 s apart): StreamPro-F1 matches
# predictions first-come, so an answer due within an earlier one's window (3 s after it) could never be
# credited, and a perfect model would not score 1. Distractor events keep fully random times.
SEPARATION = 4
TASK_TEXT = {  # the question templates, also used to train the tiny tokenizer (model.py)
    "OU0": "Tell me when the square turns red.",
    "OU1": "Tell me when the {shape} turns {colour}.",
    "OU": "Tell me every time the {colour} {shape} changes colour.",
    "AA": "Alert me at once if anything unusual happens.",
    "EU": "Describe each movement of the {colour} {shape} as soon as it is complete.",
    "TP": "What does the {colour2} {shape2} do after the {colour} {shape} moves {dir}?",
    "TG": "When does the {colour} {shape} move {dir}? Tell me its start and end times as soon as it stops.",
    "GP": "Goal: bring the {colour} {shape} to the {p1}, then to the {p2}, then to the {p3}. Each time a step is done, tell me the next one.",
    "RF": "Warn me 3 seconds before the {colour} {shape} hits a wall.",
}


class Scene:
    """Objects with per-second state: centre (x, y), colour, visibility. Positions are interpolated
    linearly between whole seconds (motion), colour and visibility switch at whole seconds."""

    def __init__(self, rng, duration, size, n_objects, colours=None, shapes=None):
        self.rng, self.T, self.size = rng, duration, size
        self.obj = []
        cells = rng.permutation(9)[:n_objects]
        colours = colours or list(rng.permutation(list(COLOURS))[:n_objects])
        shapes = shapes or [SHAPES[i] for i in rng.integers(0, 3, n_objects)]
        for i in range(n_objects):
            x, y = self.cell_xy(cells[i] % 3, cells[i] // 3)
            self.obj.append({"shape": shapes[i], "x": np.full(duration + 2, x), "y": np.full(duration + 2, y),
                             "colour": [colours[i]] * (duration + 2), "visible": np.ones(duration + 2, bool)})
        self.flash = np.zeros(duration + 2, bool)
        self.busy = np.zeros((n_objects, duration + 2), bool)  # seconds an object is moving

    def cell_xy(self, cx, cy):
        return (cx + 0.5) * self.size / 3, (cy + 0.5) * self.size / 3

    def cell_of(self, i, s):
        o = self.obj[i]
        return int(o["x"][s] * 3 // self.size), int(o["y"][s] * 3 // self.size)

    def move(self, i, s, e, x, y):
        """Object i glides from where it is at second s to (x, y), arriving at second e."""
        o = self.obj[i]
        for key, to in (("x", x), ("y", y)):
            a = o[key][s]
            o[key][s:e + 1] = a + (to - a) * np.arange(e - s + 1) / (e - s)
            o[key][e + 1:] = to
        self.busy[i, s:e] = True

    def free(self, i, s, e, cx, cy):
        """Is cell (cx, cy) on the grid and unused by the other objects from s on?"""
        if not (0 <= cx < 3 and 0 <= cy < 3):
            return False
        return all(j == i or all(self.cell_of(j, t) != (cx, cy) for t in range(s, self.T + 1)) for j in range(len(self.obj)))

    def set_colour(self, i, s, colour):
        self.obj[i]["colour"][s:] = [colour] * (self.T + 2 - s)

    def render(self, t):
        s, a = int(t), t - int(t)
        img = np.empty((self.size, self.size, 3), np.uint8)
        img[:] = (250, 250, 250) if self.flash[s] else BACKGROUND
        yy, xx = np.mgrid[: self.size, : self.size] + 0.5
        r = self.size / 8  # half the side of a shape
        for o in self.obj:
            if not o["visible"][s]:
                continue
            x, y = (1 - a) * o["x"][s] + a * o["x"][s + 1], (1 - a) * o["y"][s] + a * o["y"][s + 1]
            dx, dy = xx - x, yy - y
            if o["shape"] == "square":
                m = (abs(dx) <= r) & (abs(dy) <= r)
            elif o["shape"] == "circle":
                m = dx**2 + dy**2 <= r**2
            else:  # triangle pointing up
                m = (dy <= r) & (dy >= -r) & (abs(dx) <= (dy + r) / 2)
            img[m] = COLOURS[o["colour"][s]]
        return img


def poisson_times(rng, start, end, rate, gap=1):
    """Random whole seconds in [start, end) where something happens, each second independently (but
    at least `gap` seconds apart)."""
    out = []
    for s in range(start, end):
        if rng.random() < rate and (not out or s - out[-1] >= gap):
            out.append(s)
    return out


def name(scene, i):
    return f"{scene.obj[i]['colour'][0]} {scene.obj[i]['shape']}"


def colour_changes(scene, i, times, rng, target=None):
    """Object i changes to a new colour at each time; returns [(time, new colour)]. A change to
    `target` within 3 s of the previous one becomes another colour (see SEPARATION)."""
    out, last = [], -99
    for s in times:
        options = [c for c in COLOURS if c != scene.obj[i]["colour"][s] and not (c == target and s - last < SEPARATION)]
        new = str(rng.choice(options))
        scene.set_colour(i, s, new)
        out.append((s, new))
        last = s if new == target else last
    return out


def random_moves(scene, i, start, end, rng, rate=0.25, limit=99, rest=0):
    """Object i makes up to `limit` random one-cell moves (2-4 s each) at random times, at least
    `rest` seconds apart, all finished by second `end`; returns [(s, e, dir)]."""
    moves, s = [], start
    while s < end and len(moves) < limit:
        if rng.random() < rate and not scene.busy[i, s]:
            d = int(rng.integers(2, 5))
            dname = str(rng.choice(list(DIRS)))
            cx, cy = scene.cell_of(i, s)
            cx, cy = cx + DIRS[dname][0], cy + DIRS[dname][1]
            if s + d <= end and scene.free(i, s, s + d, cx, cy):
                scene.move(i, s, s + d, *scene.cell_xy(cx, cy))
                moves.append((s, s + d, dname))
                s += d + rest
                continue
        s += 1
    return moves


def instant(t, text, **slots):
    return {"time": float(t + 1), "text": text, "slots": slots}  # +1: decision-time convention above


def interval(s, e, text, **slots):
    return {"start": float(s + 1), "end": float(e + 1), "text": text, "slots": slots}


def make_sample(rng, level, task, duration, size):
    """One video's scene and its annotation (question, query time, answers), or None to draw again."""
    T = duration
    q = int(rng.integers(0, max(1, T // 5)))  # question asked in the first fifth of the video
    if level in (0, 1):
        return colour_watch(rng, level, T, size, q)
    # (ours) GP and RF scenes hold one shape, so nothing blocks its path; TP needs two
    n = {"GP": 1, "RF": 1, "TP": int(rng.integers(2, 4))}.get(task, int(rng.integers(1, 4)))
    sc = Scene(rng, T, size, n)
    made = LEVEL2[task](sc, rng, q)
    if made is None:
        return None
    question, answers = made
    for j in range(1, len(sc.obj)):  # distractors: the other shapes wander about (TP's second shape is scripted)
        if not (task == "TP" and j == 1):
            random_moves(sc, j, 0, T - 1, rng, rate=0.1)
    return sc, task, question, q, answers


def colour_watch(rng, level, T, size, q):
    """Levels 0 and 1: tell me when the square turns red (0) or a colour named in the question (1)."""
    n = 1 if level == 0 else 2
    sc = Scene(rng, T, size, n, shapes=["square"] + [str(rng.choice(SHAPES[1:]))] * (n - 1))
    target = "red" if level == 0 else str(rng.choice(list(COLOURS)))
    if sc.obj[0]["colour"][0] == target:
        sc.set_colour(0, 0, str(rng.choice([c for c in COLOURS if c != target])))
    changes = colour_changes(sc, 0, poisson_times(rng, 1, T, 0.2), rng, target=target)
    for j in range(1, n):
        colour_changes(sc, j, poisson_times(rng, 1, T, 0.2), rng)
    question = TASK_TEXT["OU0"] if level == 0 else TASK_TEXT["OU1"].format(shape="square", colour=target)
    answers = [instant(s, f"The square turned {c}.", shape="square", colour=c) for s, c in changes if c == target and s >= q]
    return sc, "OU", question, q, answers


# Level 2, one function per task: script the first shape's events after the question at q; return
# (question, answers), or None when the draw cannot make a valid sample. Events must be seen by the
# last frame T - 1, so answer times (e + 1) stay <= duration.


def task_ou(sc, rng, q):
    colour, shape, n = sc.obj[0]["colour"][0], sc.obj[0]["shape"], len(sc.obj)
    changes = colour_changes(sc, 0, poisson_times(rng, q + 1, sc.T, 0.15, gap=SEPARATION), rng)
    for j in range(1, n):
        colour_changes(sc, j, poisson_times(rng, 1, sc.T, 0.1), rng)
    return TASK_TEXT["OU"].format(colour=colour, shape=shape), [instant(s, f"The {shape} turned {c}.", shape=shape, colour=c) for s, c in changes]


def task_aa(sc, rng, q):
    random_moves(sc, 0, 0, sc.T - 1, rng, rate=0.1)
    s = int(rng.integers(q + 2, sc.T - 1))
    if rng.random() < 0.5:
        i = int(rng.integers(0, len(sc.obj)))
        sc.obj[i]["visible"][s:] = False
        answers = [instant(s, f"Alert: the {name(sc, i)} vanished.", colour=sc.obj[i]["colour"][0], shape=sc.obj[i]["shape"], event="vanished")]
    else:
        sc.flash[s] = True
        answers = [instant(s, "Alert: there was a bright flash.", event="flash")]
    return TASK_TEXT["AA"], answers


def task_eu(sc, rng, q):
    nm, colour, shape = name(sc, 0), sc.obj[0]["colour"][0], sc.obj[0]["shape"]
    moves = random_moves(sc, 0, q + 1, sc.T - 1, rng, rate=0.3, rest=SEPARATION - 2)
    return (TASK_TEXT["EU"].format(colour=colour, shape=shape),
            [interval(s, e, f"The {nm} moved {d}.", colour=colour, shape=shape, direction=d) for s, e, d in moves])


def task_tp(sc, rng, q):
    first = random_moves(sc, 0, q + 1, sc.T // 2, rng, rate=0.3, limit=1)  # the target event
    if not first:
        return None
    s0, e0, d0 = first[0]
    later = random_moves(sc, 1, e0, sc.T - 1, rng, rate=0.3, limit=2, rest=SEPARATION - 2)  # what follows it
    o0, o1 = sc.obj[0], sc.obj[1]
    question = TASK_TEXT["TP"].format(colour2=o1["colour"][0], shape2=o1["shape"], colour=o0["colour"][0], shape=o0["shape"], dir=d0)
    return question, [interval(s, e, f"The {name(sc, 1)} moved {d}.", colour=o1["colour"][0], shape=o1["shape"], direction=d) for s, e, d in later]


def task_tg(sc, rng, q):
    d0 = str(rng.choice(list(DIRS)))
    moves = random_moves(sc, 0, q + 1, sc.T - 1, rng, rate=0.25)
    hits = [m for m in moves if m[2] == d0]
    if len(hits) != 1:  # the question must name exactly one movement
        return None
    s, e, _ = hits[0]
    question = TASK_TEXT["TG"].format(colour=sc.obj[0]["colour"][0], shape=sc.obj[0]["shape"], dir=d0)
    return question, [interval(s, e, f"From {s + 1}s to {e + 1}s.", start=s + 1, end=e + 1)]


def task_gp(sc, rng, q):
    cx, cy = sc.cell_of(0, 0)
    here = [p for p, c in PLACES.items() if c == (cx, cy)]
    plan = [str(p) for p in rng.permutation([p for p in PLACES if p not in here])[:3]]
    speed = int(rng.integers(1, 3))  # seconds per cell: constant speed makes completion predictable
    s, answers = q + int(rng.integers(1, 4)), []
    for k, p in enumerate(plan):
        x0, y0 = sc.cell_of(0, s)
        e = s + speed * max(abs(PLACES[p][0] - x0), abs(PLACES[p][1] - y0))
        if e >= sc.T:
            return None
        sc.move(0, s, e, *sc.cell_xy(*PLACES[p]))
        nxt = f"Next, bring it to the {plan[k + 1]}." if k + 1 < len(plan) else "Done: the goal is reached."
        answers.append(instant(e, nxt, place=plan[k + 1]) if k + 1 < len(plan) else instant(e, nxt, event="done"))
        s = e + int(rng.integers(1, 4))
    return TASK_TEXT["GP"].format(colour=sc.obj[0]["colour"][0], shape=sc.obj[0]["shape"], p1=plan[0], p2=plan[1], p3=plan[2]), answers


def task_rf(sc, rng, q):
    size, nm, colour, shape = sc.size, name(sc, 0), sc.obj[0]["colour"][0], sc.obj[0]["shape"]
    r, v = size / 8, float(rng.integers(2, 5))  # half-side, speed in px/s
    d = str(rng.choice(list(DIRS)))
    wall = {"left": "left", "right": "right", "up": "top", "down": "bottom"}[d]
    ax, sign = ("x", "y")[DIRS[d][0] == 0], sum(DIRS[d])
    stop = size - r if sign > 0 else r  # the centre's coordinate at impact
    travel = int(rng.integers(5, 11))  # seconds of visible motion before impact (>= 2 before the warning)
    impact = q + 3 + int(rng.integers(3, 9))
    if impact >= sc.T or impact - travel < 0 or abs(stop - v * travel * sign - size / 2) > size / 2 - r:
        return None
    o, s0 = sc.obj[0], impact - travel
    o[ax][:s0] = stop - sign * v * travel
    o[ax][s0:impact + 1] = stop - sign * v * (impact - np.arange(s0, impact + 1))
    o[ax][impact + 1:] = stop  # it hits the wall and stays there: one impact, one warning
    return TASK_TEXT["RF"].format(colour=colour, shape=shape), [instant(impact - 3, f"Warning: the {nm} will hit the {wall} wall.", colour=colour, shape=shape, wall=wall)]


LEVEL2 = {"OU": task_ou, "AA": task_aa, "EU": task_eu, "TP": task_tp, "TG": task_tg, "GP": task_gp, "RF": task_rf}


def write_mp4(path, scene, fps):
    import av
    with av.open(path, "w") as c:
        st = c.add_stream("libx264", rate=fps)
        st.width = st.height = scene.size
        st.pix_fmt, st.options = "yuv420p", {"crf": "12", "preset": "ultrafast"}
        for i in range(scene.T * fps):
            for p in st.encode(av.VideoFrame.from_ndarray(scene.render(i / fps), format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)


def _job(args):
    out, split, i, seed, level, task, cfg = args
    rng = np.random.default_rng([seed, i, {"train": 0, "val": 1, "test": 2}[split]])
    while True:  # resample until the sample is valid and has an answer after the question
        T = int(rng.integers(cfg["min_dur"], cfg["max_dur"] + 1))
        made = make_sample(rng, level, task, T, cfg["size"])
        if made is not None and made[4]:
            break
    sc, task, question, q, answers = made
    rel = f"videos/{split}-{i:05d}.mp4"
    write_mp4(os.path.join(out, rel), sc, cfg["video_fps"])
    return {"id": f"{split}-{i:05d}", "video": rel, "task": task, "question": question, "query_time": float(q),
            "answers": sorted(answers, key=lambda a: a.get("time", a.get("end"))), "duration": float(T), "level": level}


def plan(n, mix, levels=(0, 1, 2)):
    """The (level, task) of each of a split's n samples: the levels in turn in proportion to `mix` (a weight
    per level 0, 1, 2), and within level 2 its seven tasks in turn, so every split is balanced."""
    cycle = [lv for lv in levels for _ in range(mix[lv])]
    tasks = {lv: ["OU"] if lv < 2 else list(LEVEL2) for lv in levels}  # levels 0 and 1 are one task each
    out, seen = [], dict.fromkeys(levels, 0)
    for i in range(n):
        lv = cycle[i % len(cycle)]
        out.append((lv, tasks[lv][seen[lv] % len(tasks[lv])]))
        seen[lv] += 1
    return out


def generate(out=DEFAULT_DATA, n_train=1200, n_val=350, n_test=350, levels=(0, 1, 2), seed=0,
             min_dur=16, max_dur=40, size=SIZE, video_fps=2, workers=2, train_mix=(1, 1, 3), eval_mix=(1, 1, 3)):
    """Write {train,val,test}.jsonl and videos/ under `out`; deterministic from `seed`; samples as `plan`
    assigns them. (ours) Every split weighs level 2 three times (mix 1, 1, 3): val and test hold 70 / 70 / 210
    samples of 350, so each level-2 task has 30, enough for a per-task score; train holds 240 / 240 / 720, so
    each SFT and RL task has about 100 videos."""
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    cfg = dict(min_dur=min_dur, max_dur=max_dur, size=size, video_fps=video_fps)
    jobs = [(out, split, i, seed, lv, task, cfg)
            for split, n, mix in (("train", n_train, train_mix), ("val", n_val, eval_mix), ("test", n_test, eval_mix))
            for i, (lv, task) in enumerate(plan(n, mix, levels))]
    with Pool(workers) as pool:
        rows = list(pool.imap(_job, jobs, chunksize=8))
    for split in ("train", "val", "test"):
        with open(os.path.join(out, f"{split}.jsonl.tmp"), "w") as f:
            for r in rows:
                if r["id"].startswith(split + "-"):
                    f.write(json.dumps(r) + "\n")
        os.replace(os.path.join(out, f"{split}.jsonl.tmp"), os.path.join(out, f"{split}.jsonl"))  # jsonl last: marks completion
    return rows


def ensure(root=DEFAULT_DATA):
    """The default data: generated on first use (about half a minute on 2 cores)."""
    if not os.path.isfile(os.path.join(root, "test.jsonl")):
        print(f"generating the synthetic benchmark into {root} ...")
        generate(root)
    return root


# -----------------------------------------------------------------------------
# Perception pairs: the single-turn data that turns a tiny random model into a tiny base VLM


def describe(scene, s):
    objs = sorted((o for o in scene.obj if o["visible"][s]), key=lambda o: (o["x"][s], o["y"][s]))
    names = [f"a {o['colour'][s]} {o['shape']}" for o in objs]
    text = " and ".join(names) if names else "nothing"
    return text[0].upper() + text[1:] + "."


def perception_pairs(n, seed=0, size=SIZE, max_objects=2):
    """n single-turn examples {"frames": uint8 (F, H, W, 3), "prompt", "answer", "slots"}: one frame
    -> "Describe the frame." or two consecutive frames -> "What changed?". `seed`: an int or a flat
    sequence of ints (numpy >= 2.5 rejects nested seed lists)."""
    rng = np.random.default_rng([*np.ravel(seed).tolist(), 7])
    out = []
    while len(out) < n:
        sc = Scene(rng, 2, size, int(rng.integers(1, max_objects + 1)))
        if rng.random() < 0.5:
            out.append({"frames": sc.render(0)[None], "prompt": "Describe the frame.", "answer": describe(sc, 0),
                        "slots": {"colours": sorted(o["colour"][0] for o in sc.obj), "shapes": sorted(o["shape"] for o in sc.obj)}})
            continue
        i, kind = int(rng.integers(0, len(sc.obj))), rng.choice(["colour", "colour", "move", "none"])
        answer, slot = "Nothing changed.", "none"
        if kind == "colour":
            new = str(rng.choice([c for c in COLOURS if c != sc.obj[i]["colour"][0]]))
            sc.set_colour(i, 1, new)
            answer, slot = f"The {sc.obj[i]['shape']} turned {new}.", new
        elif kind == "move":
            d = str(rng.choice(list(DIRS)))
            cx, cy = sc.cell_of(i, 0)
            cx, cy = cx + DIRS[d][0], cy + DIRS[d][1]
            if not sc.free(i, 0, 1, cx, cy):
                continue
            sc.move(i, 0, 1, *sc.cell_xy(cx, cy))
            answer, slot = f"The {sc.obj[i]['shape']} moved {d}.", d
        out.append({"frames": np.stack([sc.render(0), sc.render(1)]), "prompt": "What changed?", "answer": answer,
                    "slots": {"change": slot}})
    return out


NARRATED = {"colour": 0.35, "move": 0.4, "vanish": 0.1, "flash": 0.15}  # the narrate stage's events, and their shares


def narration(n, seed=0, size=SIZE, max_turns=8, p_change=0.4, events=NARRATED):
    """(ours) n short frame streams for the tiny base, each turn captioned with what happened in it: turn k
    is a 2-frame chunk (the frames at k - 0.5 s and k s, as data.load_video cuts them) and its caption is
    "The {shape} turned {colour}.", "The {shape} moved {dir}." (every turn of a 1-3 s one-cell move),
    "The {shape} vanished.", "There was a bright flash." (both turns that show the bright second) or
    "Nothing changed.". Answering every turn about its own chunk teaches the LM to read the latest frame
    among several, which single-image pairs never ask for and streaming needs at every decision (STUDY.md:
    tiny models); the events are those the level-2 tasks ask about (moves: EU, TP, TG, GP; vanishing and
    flashes: AA), `events` gives their shares."""
    rng = np.random.default_rng([*np.ravel(seed).tolist(), 11])
    out = []
    for _ in range(n):
        T = int(rng.integers(2, max_turns + 1))
        sc = Scene(rng, T, size, int(rng.integers(1, 4)))
        captions, k = ["Nothing changed."] * T, 1
        while k < T:
            live = [i for i in range(len(sc.obj)) if sc.obj[i]["visible"][k]]
            kind = str(rng.choice(list(events), p=np.array(list(events.values())) / sum(events.values()))) \
                if rng.random() < p_change and live else None
            i = int(rng.choice(live)) if live else 0
            shape = sc.obj[i]["shape"]
            if kind == "colour":
                new = str(rng.choice([c for c in COLOURS if c != sc.obj[i]["colour"][k]]))
                sc.set_colour(i, k, new)
                captions[k] = f"The {shape} turned {new}."
            elif kind == "vanish" and len(live) > 1:  # something stays on screen
                sc.obj[i]["visible"][k:] = False
                captions[k] = f"The {shape} vanished."
            elif kind == "flash":  # second k is bright: the frames at k and k + 0.5, so turns k and k + 1 show it
                sc.flash[k] = True
                captions[k:k + 2] = ["There was a bright flash."] * len(captions[k:k + 2])
                k += 1
            elif kind == "move":  # from second k - 1 to e: the turns k .. e show it moving
                e = min(T - 1, k - 1 + int(rng.integers(1, 4)))
                (cx, cy), to = sc.cell_of(i, k - 1), lambda d: (cx + DIRS[d][0], cy + DIRS[d][1])
                ds = [d for d in DIRS if sc.free(i, k - 1, e, *to(d))]
                if ds:
                    d = str(rng.choice(ds))
                    sc.move(i, k - 1, e, *sc.cell_xy(*to(d)))
                    captions[k:e + 1] = [f"The {shape} moved {d}."] * (e - k + 1)
                    k = e
            k += 1
        frames = np.stack([np.stack([sc.render(max(k - 0.5, 0.0)), sc.render(float(k))]) for k in range(T)])
        out.append({"frames": frames, "captions": captions})
    return out


def corpus():
    """Text the tiny tokenizer is trained on: every template with every value."""
    lines = [SYSTEM_PROMPT, SYSTEM_PROMPT_3, "Describe the frame.", "What changed?", "Nothing changed.", "Wait",
             "system", "user", "assistant", "You are a helpful assistant."]
    lines += [time_marker(k) for k in range(300)] + [time_marker(k, 2.0) for k in range(100)]
    for c in COLOURS:
        for s in SHAPES:
            for d in DIRS:
                lines.append(f"The {c} {s} moved {d}. The {s} turned {c}. A {c} {s} and a {c} {s}.")
                lines += [t.format(colour=c, shape=s, dir=d, colour2=c, shape2=s, p1="top left", p2="centre", p3="bottom right")
                          for t in TASK_TEXT.values()]
            lines += [f"Alert: the {c} {s} vanished. Warning: the {c} {s} will hit the {w} wall." for w in ("left", "right", "top", "bottom")]
    lines += [f"Next, bring it to the {p}. Done: the goal is reached. Alert: there was a bright flash." for p in PLACES]
    lines += [f"From {a}s to {a + b}s." for a in range(60) for b in range(1, 6)]
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_DATA)
    p.add_argument("--n_train", type=int, default=1200)
    p.add_argument("--n_val", type=int, default=350)
    p.add_argument("--n_test", type=int, default=350)
    p.add_argument("--levels", default="0,1,2", help="comma-separated difficulty levels to mix")
    p.add_argument("--train_mix", default="1,1,3", help="train: weights of levels 0, 1, 2")
    p.add_argument("--eval_mix", default="1,1,3", help="val and test: weights of levels 0, 1, 2 (30 per level-2 task in 350)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min_dur", type=int, default=16)
    p.add_argument("--max_dur", type=int, default=40)
    p.add_argument("--size", type=int, default=SIZE, help="frame side in pixels")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(cli_args())
    check_args(a)
    t0 = time.time()
    rows = generate(a.out, a.n_train, a.n_val, a.n_test, tuple(int(x) for x in a.levels.split(",")), a.seed,
                    a.min_dur, a.max_dur, a.size, workers=a.workers, train_mix=tuple(int(x) for x in a.train_mix.split(",")),
                    eval_mix=tuple(int(x) for x in a.eval_mix.split(",")))
    print(f"wrote {len(rows)} samples to {a.out} in {time.time() - t0:.1f} s")


def check_args(a):
    """Flags that cannot work, named before any video is drawn."""
    check_flags(a, positive=("min_dur", "size", "workers"), non_negative=("n_train", "n_val", "n_test"))
    if a.max_dur < a.min_dur:
        raise UserError(f"--max_dur {a.max_dur}: must be >= --min_dur {a.min_dur}")
    if not set(a.levels.split(",")) <= {"0", "1", "2"}:
        raise UserError(f"--levels {a.levels}: expected levels among 0,1,2 (comma-separated)")
    for flag in ("train_mix", "eval_mix"):
        w = getattr(a, flag).split(",")
        if len(w) != 3 or not all(x.isdigit() for x in w) or not any(int(w[int(lv)]) for lv in a.levels.split(",")):
            raise UserError(f"--{flag} {getattr(a, flag)}: expected three weights (levels 0, 1, 2) such as 1,1,3, one of --levels' above 0")


if __name__ == "__main__":
    run_cli(main)
