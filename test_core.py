"""
Tests: the turn format, the metric, the losses, the rewards, training, inference. CPU only, tiny
random models, nothing downloaded.

    python -m pytest -q test_core.py               # everything (a few minutes on 2 cores)
    python -m pytest -q test_core.py -m "not slow" # the fast part
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import model as M
import synthetic

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny random models of both families, built once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: M.build_tiny(f, str(root / f)) for f in FAMILIES}


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthetic.generate(str(root), n_train=14, n_val=4, n_test=21, levels=(0, 1, 2), workers=1, max_dur=24)
    return root


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def run_py(*cmd, env=None):
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def with_broken_video(synth, split, n, bad, tmp_path):
    """The first n samples of a synthetic split, sample `bad` pointing at a corrupt mp4."""
    rows = [json.loads(l) for l in open(synth / f"{split}.jsonl")][:n]
    for r in rows:
        r["video"] = str(synth / r["video"])
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 500)
    rows[bad]["video"] = str(tmp_path / "broken.mp4")
    return rows, write_jsonl(tmp_path / "ann.jsonl", rows)


def sample(answers, query_time=0.0, duration=10.0, task="OU"):
    return {"id": "s", "video": "v.mp4", "task": task, "question": "Q?", "query_time": query_time,
            "answers": answers, "duration": duration}


# -----------------------------------------------------------------------------
# Turn format and labels (SPEC section 1)


def decisions(conv):
    return [t["decision"][2:-1] for t in conv["turns"]]  # "</Silence>" -> "Silence"


def test_labels_instant_and_interval_two_states():
    s = sample([{"time": 3.0, "text": "a"}, {"time": 5.5, "text": "b"}, {"start": 6.0, "end": 8.0, "text": "c"}], query_time=1.2)
    conv = data.build_conversation(s, 10)
    # instant at 3.0 -> first decision time t_k = k + 1 >= 3 -> turn 2; 5.5 -> turn 5; interval end 8 -> turn 7
    assert [k for k, d in enumerate(decisions(conv)) if d == "Response"] == [2, 5, 7]
    assert conv["turns"][2]["target"] == "</Response> a" and conv["turns"][7]["target"] == "</Response> c"
    assert conv["q_turn"] == 1 and conv["turns"][1]["question"] == "Q?" and conv["turns"][0]["question"] is None
    assert all(t["target"] == "</Silence>" for k, t in enumerate(conv["turns"]) if k not in (2, 5, 7))
    assert [t["marker"] for t in conv["turns"][:2]] == ["<0s-1s>", "<1s-2s>"]


def test_labels_three_states_standby_from_start_to_response():
    s = sample([{"start": 3.0, "end": 7.0, "text": "c"}, {"time": 5.0, "text": "i"}], query_time=0)
    conv = data.build_conversation(s, 10, states=3)
    # interval [3, 7]: turns 3..5 standby (turn 3 contains the start), response at turn 6 (t=7);
    # the instant at 5.0 is due at turn 4 and a response wins over standby
    assert decisions(conv) == ["Silence"] * 3 + ["Standby", "Response", "Standby", "Response"] + ["Silence"] * 3
    assert "</Standby>" in conv["system"] and "</Standby>" not in data.build_conversation(s, 10)["system"]


def test_labels_edges_last_turn_and_answers_before_the_question():
    s = sample([{"time": 10.0, "text": "last"}, {"time": 1.0, "text": "early"}, {"start": 0.0, "end": 2.0, "text": "before"}],
               query_time=4.0)
    conv = data.build_conversation(s, 10)
    d = decisions(conv)
    assert d[9] == "Response" and conv["turns"][9]["target"] == "</Response> last"  # due at the last decision time
    # answers due before the question are given at the question turn, together (ours)
    assert d[4] == "Response" and conv["turns"][4]["target"] == "</Response> early before"
    assert d.count("Response") == 2 and data.question_turn(4.0) == 4 and data.due_turn(4.0) == 3


def test_labels_fps_two_and_markers():
    s = sample([{"time": 1.5, "text": "x"}], duration=3.0)
    conv = data.build_conversation(s, data.num_turns(3.0, 2.0), fps=2.0)
    assert len(conv["turns"]) == 6 and decisions(conv).index("Response") == 2  # t_k = (k+1)/2 >= 1.5 -> k = 2
    assert conv["turns"][2]["marker"] == "<1.0s-1.5s>"


def test_window_keeps_question_turn_and_last_w():
    assert data.window_turns(10, 2, 4) == [2, 6, 7, 8, 9]
    assert data.window_turns(10, 7, 4) == [6, 7, 8, 9]
    assert data.window_turns(10, 2, 0) == list(range(10)) and data.window_turns(3, 0, 5) == [0, 1, 2]
    assert data.window_turns(10, -1, 4) == [6, 7, 8, 9]  # no question yet (a stream's window before it is asked)


def test_split_decision():
    assert data.split_decision("</Response> The square turned red.") == ("</Response>", "The square turned red.")
    assert data.split_decision(" </Silence>") == ("</Silence>", "")
    assert data.split_decision("hello") == (None, "hello")


# -----------------------------------------------------------------------------
# Annotation validation


@pytest.mark.parametrize("mutate, field, expect", [
    (lambda s: s.pop("question"), "question", "missing"),
    (lambda s: s["answers"].append({"text": "x"}), "answers[1]", "either 'time' or both"),
    (lambda s: s["answers"].append({"start": 5, "end": 4, "text": "x"}), "answers[1].end", "end >= start"),
    (lambda s: s["answers"].append({"time": 12, "text": "x"}), "answers", "beyond the video's duration"),
    (lambda s: s.update(query_time=-1), "query_time", "number >= 0"),
    (lambda s: s["answers"][0].pop("text"), "answers[0].text", "missing"),
    (lambda s: s.update(video="nope.mp4"), "video", "video file not found"),
])
def test_validation_errors_name_file_line_field(tmp_path, mutate, field, expect):
    (tmp_path / "v.mp4").write_bytes(b"")
    good = sample([{"time": 2.0, "text": "a"}])
    bad = json.loads(json.dumps(good))
    bad["id"] = "t"
    mutate(bad)
    path = write_jsonl(tmp_path / "ann.jsonl", [good, bad])
    with pytest.raises(data.AnnotationError) as e:
        data.load_annotations(path)
    msg = str(e.value)
    assert f"{path}:2:" in msg and f"'{field}'" in msg and expect in msg


def test_validation_duplicate_ids_and_bad_json(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"")
    s = sample([{"time": 2.0, "text": "a"}])
    with pytest.raises(data.AnnotationError, match=r"ann.jsonl:3: field 'id': duplicate id 's' \(first seen on line 1\)"):
        data.load_annotations(write_jsonl(tmp_path / "ann.jsonl", [s, "", s]))
    with pytest.raises(data.AnnotationError, match=r"bad.jsonl:1: not valid JSON"):
        data.load_annotations(write_jsonl(tmp_path / "bad.jsonl", ["{oops"]))
    ok = data.load_annotations(write_jsonl(tmp_path / "ok.jsonl", [s]))
    assert ok[0]["video_path"] == str(tmp_path / "v.mp4")
    # scoring needs no videos: check_videos=False accepts an absent file
    s2 = dict(s, video="absent.mp4")
    assert data.load_annotations(write_jsonl(tmp_path / "nov.jsonl", [s2]), check_videos=False)[0]["id"] == "s"


# -----------------------------------------------------------------------------
# Video decoding and the synthetic benchmark


def test_decode_synthetic_mp4_at_1fps_and_2fps(synth):
    samples = data.load_annotations(str(synth / "train.jsonl"))
    s = next(x for x in samples if x["level"] == 0)
    frames, times = data.load_video(s["video_path"])
    assert frames.dtype == np.uint8 and frames.shape == (int(s["duration"]), 1, synthetic.SIZE, synthetic.SIZE, 3)
    assert np.allclose(times, np.arange(len(frames)))
    f2, t2 = data.load_video(s["video_path"], fps=2.0)
    assert len(f2) == 2 * len(frames) and np.allclose(t2[:3], [0, 0.5, 1.0])
    # 2-frame turns: turn k holds the frames at k - 0.5 (clamped at 0) and k
    pairs, _ = data.load_video(s["video_path"], frames_per_turn=2)
    assert pairs.shape == (len(frames), 2, synthetic.SIZE, synthetic.SIZE, 3) and (pairs[:, 1] == frames[:, 0]).all()
    assert (pairs[0, 0] == f2[0, 0]).all() and all((pairs[k, 0] == f2[2 * k - 1, 0]).all() for k in range(1, len(frames)))
    frames = frames[:, 0]
    # ground truth is visible: the square is red in the frame of every answer's turn (decision time t -> frame t - 1)
    red = lambda f: int(((f[..., 0] > 170) & (f[..., 1] < 90) & (f[..., 2] < 90)).sum())
    for a in s["answers"]:
        k = int(a["time"]) - 1
        assert red(frames[k]) > 50 and red(frames[k - 1]) == 0  # the change shows first in frame k
    assert data.video_duration(s["video_path"]) == s["duration"]


def test_video_errors_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(data.VideoError, match="corrupt.mp4: cannot read video"):
        data.load_video(str(bad))
    with pytest.raises(data.VideoError, match="missing.mp4: video file not found"):
        data.load_video(str(tmp_path / "missing.mp4"))


def test_synthetic_splits_cover_all_tasks_and_are_deterministic(synth, tmp_path):
    rows = [json.loads(l) for l in open(synth / "test.jsonl")]
    assert {r["task"] for r in rows if r["level"] == 2} == set(data.TASKS)
    assert {r["level"] for r in rows} == {0, 1, 2}
    for r in rows:
        assert r["answers"] and all(a.get("time", a.get("end")) <= r["duration"] for a in r["answers"])
        assert all("slots" in a for a in r["answers"])
    again = synthetic.generate(str(tmp_path), n_train=0, n_val=0, n_test=21, levels=(0, 1, 2), workers=1, max_dur=24)
    assert [json.loads(json.dumps(r)) for r in again] == rows
    assert open(tmp_path / "videos" / "test-00003.mp4", "rb").read() == open(synth / "videos" / "test-00003.mp4", "rb").read()


def test_plan_gives_every_level2_task_30_samples_in_val_and_test():
    import collections
    import inspect
    d = {k: v.default for k, v in inspect.signature(synthetic.generate).parameters.items()}
    for n in (d["n_val"], d["n_test"]):
        counts = collections.Counter(synthetic.plan(n, d["eval_mix"]))
        assert min(counts[(2, t)] for t in data.TASKS) >= 30, counts
    assert synthetic.plan(7, (1, 1, 3)) == [(0, "OU"), (1, "OU"), (2, "OU"), (2, "AA"), (2, "EU"), (0, "OU"), (1, "OU")]
    assert synthetic.plan(4, (1, 1, 1), levels=(2,)) == [(2, "OU"), (2, "AA"), (2, "EU"), (2, "TP")]


def test_task_filters_follow_the_papers_split(synth):
    import grpo
    every = [{"level": lv, "task": "OU"} for lv in (0, 1)] + [{"level": 2, "task": t} for t in data.TASKS]
    sees = lambda a: {(s["level"], s["task"]) for s in data.select(every, *data.parse_filter(a.levels, a.tasks))}
    sft_split = {(0, "OU"), (1, "OU"), (2, "OU"), (2, "EU"), (2, "TP"), (2, "TG")}  # paper: EC AC EU OU TP TG
    rl_split = {(2, t) for t in ("EU", "OU", "AA", "TP", "TG", "GP")}  # paper: EU OU AA TP TG GP
    assert sees(sft.get_args([])) == sft_split and sees(grpo.get_args([])) == rl_split
    # the pipeline's control continues SFT on GRPO's videos, the same split given to both
    rl = re.search(r'^RL="([^"]*)"', open(os.path.join(os.path.dirname(__file__), "pipeline.sh")).read(), re.M).group(1).split()
    assert sees(sft.get_args(rl)) == sees(grpo.get_args(rl)) == rl_split
    assert not any(t == "RF" for _, t in sft_split | rl_split)  # held out of both: tested only
    # ... and in GRPO's order: the same samples, so batch_indices gives both the same videos step by step
    files = ["--data", str(synth / "train.jsonl"), "--val", ""]
    control = sft.StreamData(str(synth / "train.jsonl"), None, sft.get_args(rl + files))
    assert [s["id"] for s in control.samples] == [s["id"] for s in grpo.datasets(grpo.get_args(rl + files))[0]]
    assert {s["task"] for s in control.samples} <= {t for _, t in rl_split}
    # filters: '' = none; a sample without a level (real data) passes --levels, not --tasks
    real = [{"task": "QA"}, {"task": "EU"}]
    assert data.select(real, *data.parse_filter("0,1", "")) == real
    assert data.select(real, *data.parse_filter("0,1", "EU, TP")) == real[1:]
    assert data.select(every, *data.parse_filter("", "")) == every
    assert data.select(every, *data.parse_filter("1", "")) == every[1:2]


def test_show_cli(tiny, synth):
    out = run_py("model.py", "--show", "1", "--data", str(synth), "--model", tiny["qwen2_5_vl"])
    assert "turn   0 " in out and "[img x9]" in out and "\u27e6</Silence>\u27e7" in out and "supervised" in out


def test_perception_pairs():
    pairs = synthetic.perception_pairs(40, seed=1)
    assert len(pairs) == 40 and {p["prompt"] for p in pairs} == {"Describe the frame.", "What changed?"}
    for p in pairs:
        assert p["frames"].shape[0] == (1 if p["prompt"] == "Describe the frame." else 2)
    same = [p for p in pairs if p["answer"] == "Nothing changed."]
    assert all((p["frames"][0] == p["frames"][1]).all() for p in same)


# -----------------------------------------------------------------------------
# Tokenisation, collation, tiny models


def encoded(tiny, family, synth, n=2, states=2):
    model, processor = M.load(tiny[family])
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    out = []
    for s in data.load_annotations(str(synth / "train.jsonl"))[:n]:
        frames, _ = fmt.video(s["video_path"])
        out.append((s, frames, fmt.encode(data.build_conversation(s, len(frames), states=states), frames)))
    return model, processor, fmt, out


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenisation_round_trip_and_supervised_spans(tiny, synth, family):
    model, processor, fmt, items = encoded(tiny, family, synth, n=3, states=3)
    tok = processor.tokenizer
    for s, frames, enc in items:
        conv = data.build_conversation(s, len(frames), states=3)
        # the ids equal the chat template's rendering of the whole conversation, image pads expanded
        msgs = [{"role": "system", "content": [{"type": "text", "text": conv["system"]}]}]
        for t in conv["turns"]:
            content = [{"type": "text", "text": t["marker"]}, {"type": "image"}] + ([{"type": "text", "text": t["question"]}] if t["question"] else [])
            msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": t["target"]}]}]
        text = processor.apply_chat_template(msgs)
        n_img = int(enc["image_grid_thw"][0].prod()) // 4
        text = text.replace("<|image_pad|>", "<|image_pad|>" * n_img)
        assert enc["input_ids"].tolist() == tok(text, add_special_tokens=False)["input_ids"]
        # supervised tokens are exactly each turn's assistant content and its end-of-turn token
        ids, labels = enc["input_ids"], enc["labels"]
        assert ((labels == -100) | (labels == ids)).all()
        for (a, d, b), t in zip(enc["turn_spans"], conv["turns"]):
            sup = [int(i) for i, l in zip(ids[a:b], labels[a:b]) if l != -100]
            assert tok.decode(sup) == t["target"] + "<|im_end|>"
            assert labels[a:d].eq(-100).all() and ids[d] == fmt.decision_ids[t["decision"]]
            assert enc["classes"][d] == data.CLASS_OF[t["decision"]]
        cls = enc["classes"]
        assert (cls[labels == -100] == data.IGNORE).all() and (cls[labels != -100] != data.IGNORE).all()
        n_resp = sum(t["decision"] == data.RESPONSE for t in conv["turns"])
        assert int((cls == data.C_RESPONSE).sum()) == n_resp
        assert int((cls == data.C_STANDBY).sum()) == sum(t["decision"] == data.STANDBY for t in conv["turns"])
        assert int((enc["mm_token_type_ids"] == 1).sum()) == n_img * len(frames)


@pytest.mark.parametrize("family", FAMILIES)
def test_collate_right_pads_and_tiny_forward_backward(tiny, synth, family):
    model, processor, fmt, items = encoded(tiny, family, synth, n=2)
    a, b = items[0][2], items[1][2]
    if len(a["input_ids"]) == len(b["input_ids"]):
        pytest.skip("need two lengths")
    batch = data.collate([a, b], processor.tokenizer.pad_token_id)
    L = batch["input_ids"].shape[1]
    short = 0 if len(a["input_ids"]) < len(b["input_ids"]) else 1
    n = int(batch["attention_mask"][short].sum())
    assert n < L and batch["attention_mask"][short, :n].all() and not batch["attention_mask"][short, n:].any()
    assert (batch["labels"][short, n:] == -100).all() and (batch["input_ids"][short, n:] == processor.tokenizer.pad_token_id).all()
    assert batch["pixel_values"].shape[0] == a["pixel_values"].shape[0] + b["pixel_values"].shape[0]
    model.eval()
    with torch.no_grad():  # right padding changes nothing for the real tokens (positions included)
        alone = model(**data.model_inputs(data.collate([items[short][2]], processor.tokenizer.pad_token_id))).logits[0]
        padded = model(**data.model_inputs(batch)).logits[short, :n]
    assert torch.allclose(alone, padded, atol=1e-4)
    model.train()
    out = model(**data.model_inputs(batch))
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for n_, p in model.model.visual.named_parameters() if "merger" not in n_)  # ViT frozen
    assert model.model.language_model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_two_frame_chunk_fills_the_vits_temporal_patch(tiny, family):
    _, processor = M.load(tiny[family])
    fmt = data.ChatFormat(processor, 2)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 255, (2, 56, 56, 3), dtype=np.uint8)
    P = processor.image_processor.patch_size
    view = lambda pv: pv.view(-1, 3, 2, P, P)
    still = view(fmt.images(a[None])[0])
    assert torch.equal(still[:, :, 0], still[:, :, 1])  # a still image: the processor repeats it in time
    pair, grid, n = fmt.images(np.stack([a, b])[None])
    assert torch.equal(view(pair)[:, :, 0], still[:, :, 0]) and torch.equal(view(pair)[:, :, 1], view(fmt.images(b[None])[0])[:, :, 1])
    assert n == [4] and grid.tolist() == [[1] + grid[0, 1:].tolist()]  # one temporal step: one image placeholder


@pytest.mark.parametrize("family", FAMILIES)
def test_images_table_gives_the_processors_values_bit_for_bit(tiny, family):
    """ChatFormat.images runs the image processor once per frame size, then reads a 3 x 256 table (_table): the
    same pixel values bit for bit, one- and two-frame chunks; a size the processor resizes keeps the processor."""
    _, processor = M.load(tiny[family])
    rng = np.random.default_rng(0)
    for fpt in (1, 2):
        fmt = data.ChatFormat(processor, fpt)
        for size in [(56, 56), (64, 96), (112, 56), (50, 60)]:
            x = rng.integers(0, 256, (3, fpt, *size, 3), dtype=np.uint8)
            got, want = fmt.images(x), fmt._processed(x)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
            assert (fmt._tables[size] is not None) == (size[0] % fmt.factor == 0 and size[1] % fmt.factor == 0)


def test_decision_tokens_are_added_as_single_tokens(tiny):
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny["qwen2_5_vl"])
    assert not set(data.DECISION_TOKENS) & set(tok.get_vocab())  # a released tokenizer has none
    model, processor = M.load(tiny["qwen2_5_vl"])
    tok = processor.tokenizer
    for t in data.DECISION_TOKENS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) == model.config.text_config.vocab_size  # the tiny matrix grew to fit
    ids = tok.convert_tokens_to_ids(list(data.DECISION_TOKENS))
    assert torch.allclose(emb[ids[0]], emb[: ids[0]].mean(0), atol=1e-6)
    n = len(tok)
    M.add_decision_tokens(model, tok)  # idempotent
    assert len(tok) == n
    # a real checkpoint has spare rows beyond len(tokenizer): the new ids use them, the matrix keeps its size
    raw = AutoModelForImageTextToText.from_pretrained(tiny["qwen2_5_vl"])
    tok = AutoTokenizer.from_pretrained(tiny["qwen2_5_vl"])
    raw.resize_token_embeddings(len(tok) + 16)
    M.add_decision_tokens(raw, tok)
    assert raw.get_input_embeddings().weight.shape[0] == len(tok) + 13 and max(tok.convert_tokens_to_ids(list(data.DECISION_TOKENS))) < len(tok)
    mask = M.vocab_mask(raw, tok)
    assert mask[len(tok):].all() and mask[tok.convert_tokens_to_ids("<|image_pad|>")] and mask[tok.convert_tokens_to_ids("<|im_start|>")]
    assert not mask[tok.convert_tokens_to_ids("<|im_end|>")] and not mask[tok.convert_tokens_to_ids(list(data.DECISION_TOKENS))].any()
    assert not mask[tok("red", add_special_tokens=False)["input_ids"]].any()
    with pytest.raises(FileNotFoundError, match="no such model directory"):  # not a hub lookup with retries
        M.load(tiny["qwen2_5_vl"] + "-missing")


# -----------------------------------------------------------------------------
# Losses (SPEC section 2), against hand computation

import math  # noqa: E402

import losses  # noqa: E402
import metric  # noqa: E402
import sft  # noqa: E402

LN2 = math.log(2)


def toy_batch():
    """Vocabulary of 4: id 0 = silence, 1 = response, 2-3 text. Logits are log-probabilities, so
    p(target) is exact: silence 0.5, silence 0.25, response 0.5, text 0.5, then one ignored position."""
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.25, 0.5, 0.125, 0.125],
                      [0.1, 0.2, 0.5, 0.2], [0.7, 0.1, 0.1, 0.1]])
    return p.log(), torch.tensor([0, 0, 1, 2, -100])


def test_cb_weights_worked_values_from_spec():
    assert torch.allclose(losses.cb_class_weights([50000, 2000]), torch.tensor([0.309, 1.691]), atol=1e-3)
    assert torch.allclose(losses.cb_class_weights([5000, 200]), torch.tensor([0.096, 1.904]), atol=1e-3)
    # E = (1 - 0.9999^n) / 0.0001: E(10) = 9.9955, E(5) = 4.9990 -> w = 2 * (1/E_k) / sum(1/E) = (0.66678, 1.33322)
    assert torch.allclose(losses.cb_class_weights([10, 5]), torch.tensor([0.666778, 1.333222]), atol=1e-5)


def test_cb_weights_absent_class_beta_edges():
    w = losses.cb_class_weights([10, 0, 5])  # absent class: weight 0, left out of the normalisation
    assert torch.allclose(w, torch.tensor([0.666778, 0.0, 1.333222]), atol=1e-5) and abs(w.sum() - 2) < 1e-5
    assert torch.equal(losses.cb_class_weights([7, 0]), torch.tensor([1.0, 0.0]))
    assert torch.equal(losses.cb_class_weights([0, 0]), torch.zeros(2))
    assert torch.allclose(losses.cb_class_weights([30, 10], beta=0.0), torch.ones(2))  # beta 0: no re-weighting
    assert torch.allclose(losses.cb_class_weights([30, 10], beta=1.0), torch.tensor([0.5, 1.5]))  # inverse frequency


def test_cb_stream_loss_by_hand():
    logits, labels = toy_batch()
    # counts (2, 1): E = (1.9999, 1) -> w = (0.666689, 1.333311); text weight lambda = 2
    # L = [0.666689 ln2 + 0.666689 ln4 + 1.333311 ln2 + 2 ln2] / 4 = 0.924204
    assert abs(losses.cb_stream_loss(logits, labels, [0, 1]).item() - 0.924204) < 1e-5
    # lambda_text 1 and beta 0 (all weights 1): plain CE
    assert abs(losses.cb_stream_loss(logits, labels, [0, 1], beta=0.0, lambda_text=1.0).item() - 5 * LN2 / 4) < 1e-6
    # a batch without any response: the silence class alone gets weight 1
    assert abs(losses.cb_stream_loss(logits[:2], labels[:2], [0, 1]).item() - (LN2 + 2 * LN2) / 2) < 1e-6


def test_focal_and_ce_by_hand():
    logits, labels = toy_batch()
    # alpha = (1/2) * 3 / n_k = (0.75, 1.5); w = alpha (1-p)^2: 0.75*0.25, 0.75*0.5625, 1.5*0.25; text 1
    # L = [0.1875 ln2 + 0.421875 ln4 + 0.375 ln2 + ln2] / 4 = 0.416971
    assert abs(losses.focal_loss(logits, labels, [0, 1]).item() - 0.416971) < 1e-5
    assert abs(losses.ce_loss(logits, labels).item() - 5 * LN2 / 4) < 1e-6  # 0.866434
    assert torch.allclose(losses.focal_alpha([2, 0, 1]), torch.tensor([0.75, 0.0, 1.5]))


def test_losses_accept_batch_shape_and_split_counts_equal_whole():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 9)
    labels = torch.tensor([[0, 0, 5, -100, 1, 7], [0, 2, 0, 0, 1, -100]])
    ids = [0, 2, 1]
    for fn in (lambda lg, lb, **k: losses.cb_stream_loss(lg, lb, ids, **k), lambda lg, lb, **k: losses.focal_loss(lg, lb, ids, **k)):
        whole = fn(logits, labels)
        assert torch.allclose(whole, fn(logits.reshape(12, 9), labels.reshape(12)))
        counts, n = losses.class_counts(labels, ids), int((labels != -100).sum())
        halves = fn(logits[:1], labels[:1], counts=counts, num_items=n) + fn(logits[1:], labels[1:], counts=counts, num_items=n)
        assert torch.allclose(whole, halves, atol=1e-6)
        assert not torch.allclose(whole, (fn(logits[:1], labels[:1]) + fn(logits[1:], labels[1:])) / 2)  # local counts differ


def test_lr_schedule_and_batch_order_and_auc():
    assert sft.lr_at(0, 100, 1.0, 10, 0.1) == 0.1 and sft.lr_at(9, 100, 1.0, 10, 0.1) == 1.0
    assert abs(sft.lr_at(100, 100, 1.0, 10, 0.1) - 0.1) < 1e-12 and abs(sft.lr_at(55, 100, 1.0, 10, 0.1) - 0.55) < 1e-12
    seen = [i for s in range(5) for i in sft.batch_indices(s, 2, 10, seed=3)]
    assert sorted(seen) == list(range(10)) and seen != list(range(10))  # one epoch: a permutation
    assert sft.batch_indices(7, 4, 10, 3) == sft.batch_indices(7, 4, 10, 3)
    assert metric.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # pairs: (.35>.1) (.35<.4) (.8>.1) (.8>.4)
    assert metric.roc_auc([1, 2], [0, 1]) == 1.0 and metric.roc_auc([2, 1], [0, 1]) == 0.0
    assert metric.roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5 and math.isnan(metric.roc_auc([0.3], [1]))


# -----------------------------------------------------------------------------
# StreamPro-F1 (metric.py), GRPO rewards (rewards.py), bench.py scoring: hand-worked numbers

import http.server  # noqa: E402
import threading  # noqa: E402

import bench  # noqa: E402
import metric  # noqa: E402
import rewards  # noqa: E402
from data import load_annotations  # noqa: E402
from metric import TIMING, HTTPJudge, JudgeError, OfflineJudge, aggregate, iou, parse_interval, score_sample  # noqa: E402

ONE = lambda q, p, a: 1.0  # a judge that accepts everything: S = S_time  # noqa: E731
SAME = lambda q, p, a: 1.0 if p == a["text"] else 0.0  # noqa: E731


def msample(task, answers, question="Q?", query_time=0.0, **kw):
    return {"id": "s", "task": task, "question": question, "query_time": query_time, "answers": answers, **kw}


def at(*times, text="x"):
    return [{"time": t, "text": text} for t in times]


# -----------------------------------------------------------------------------
# metric.py: windows, tau and t_opt per task; one prediction, one GT, judge = 1, so P = R = F1 = S_time

WINDOW_CASES = [
    # OU: t_opt 10, window [7, 13], tau 4
    ("OU", {"time": 10}, 10, 1.0), ("OU", {"time": 10}, 11, 0.75), ("OU", {"time": 10}, 7, 0.25),
    ("OU", {"time": 10}, 6.99, 0.0), ("OU", {"time": 10}, 13, 0.25), ("OU", {"time": 10}, 13.01, 0.0),
    # AA: window [10, 15], tau 6
    ("AA", {"time": 10}, 10, 1.0), ("AA", {"time": 10}, 9.99, 0.0), ("AA", {"time": 10}, 13, 0.5),
    ("AA", {"time": 10}, 15, 1 / 6), ("AA", {"time": 10}, 15.01, 0.0),
    # GP: window [7, 10], tau 4: nothing after t_opt
    ("GP", {"time": 10}, 7, 0.25), ("GP", {"time": 10}, 6.99, 0.0), ("GP", {"time": 10}, 9, 0.75),
    ("GP", {"time": 10}, 10, 1.0), ("GP", {"time": 10}, 10.01, 0.0),
    # RF: window [9, 13], tau 2 early, 4 late
    ("RF", {"time": 10}, 9, 0.5), ("RF", {"time": 10}, 8.99, 0.0), ("RF", {"time": 10}, 9.5, 0.75),
    ("RF", {"time": 10}, 10, 1.0), ("RF", {"time": 10}, 12, 0.5), ("RF", {"time": 10}, 13, 0.25),
    ("RF", {"time": 10}, 13.01, 0.0),
    # EU / TP: t_opt [5, 10] (dt 0 inside), window [5, 13], tau 4 after the end
    ("EU", {"start": 5, "end": 10}, 4.99, 0.0), ("EU", {"start": 5, "end": 10}, 5, 1.0),
    ("EU", {"start": 5, "end": 10}, 7.5, 1.0), ("EU", {"start": 5, "end": 10}, 10, 1.0),
    ("EU", {"start": 5, "end": 10}, 12, 0.5), ("EU", {"start": 5, "end": 10}, 13, 0.25),
    ("EU", {"start": 5, "end": 10}, 13.01, 0.0),
    ("TP", {"start": 5, "end": 10}, 5, 1.0), ("TP", {"start": 5, "end": 10}, 13, 0.25),
    ("TP", {"start": 5, "end": 10}, 4.99, 0.0), ("TP", {"start": 5, "end": 10}, 13.01, 0.0),
    # an instant answer in an interval task is [t, t]: window [10, 13]
    ("EU", {"time": 10}, 9.99, 0.0), ("EU", {"time": 10}, 10, 1.0), ("EU", {"time": 10}, 11, 0.75),
    ("EU", {"time": 10}, 13, 0.25), ("EU", {"time": 10}, 13.01, 0.0),
    # a timestamp task answers an interval at its end: OU [2, 10] -> t_opt 10, window [7, 13]
    ("OU", {"start": 2, "end": 10}, 5, 0.0), ("OU", {"start": 2, "end": 10}, 7, 0.25),
    ("OU", {"start": 2, "end": 10}, 10, 1.0),
    # unknown task: timestamp, [t - 3, t + 3], tau 4
    ("narration", {"time": 10}, 7, 0.25), ("narration", {"time": 10}, 6.99, 0.0),
    ("narration", {"time": 10}, 13, 0.25), ("narration", {"time": 10}, 13.01, 0.0),
    # float rounding does not push an edge prediction out of the window
    ("OU", {"time": 0.1 + 0.2}, 3.3, 0.25),
]


@pytest.mark.parametrize("task,answer,t,expected", WINDOW_CASES)
def test_window_edges_and_time_score(task, answer, t, expected):
    row = score_sample(msample(task, [{**answer, "text": "x"}]), at(t), ONE)
    assert row["precision"] == pytest.approx(expected)
    assert row["recall"] == pytest.approx(expected)
    assert row["f1"] == pytest.approx(expected)
    assert (row["matches"][0]["match"] is None) == (expected == 0.0)


def test_tg_window_uses_iou():
    s = msample("TG", [{"start": 4, "end": 10, "text": "x"}])  # window [7, 13] around the end
    for t, st in [(7, 0.25), (6.99, 0.0), (13, 0.25), (13.01, 0.0), (10, 1.0)]:
        assert score_sample(s, [{"time": t, "text": "from 4s to 10s"}], None)["f1"] == pytest.approx(st)


def test_time_score_outside_interval_is_distance_to_nearest_boundary():
    eu = TIMING["EU"]
    assert metric.time_score(eu, (5, 10), 3) == 0.5  # 2 s before the start
    assert metric.time_score(eu, (5, 10), 11) == 0.75  # 1 s after the end
    assert metric.time_score(TIMING["RF"], (10, 10), 9) == 0.5  # early: tau 2
    assert metric.time_score(TIMING["RF"], (10, 10), 11) == 0.75  # late: tau 4


def test_several_predictions_on_one_gt_keep_the_best():
    s = msample("OU", [{"time": 10, "text": "good"}])
    row = score_sample(s, at(8, 10, 12), ONE)  # S = 0.5, 1, 0.5 -> best 1; N_pred 3
    assert row["precision"] == pytest.approx(1 / 3) and row["recall"] == 1.0
    assert row["f1"] == pytest.approx(0.5)
    judge = lambda q, p, a: 1.0 if p == "good" else 0.2
    row = score_sample(s, [{"time": 10, "text": "bad"}, {"time": 11, "text": "good"}], judge)
    # S = 1 * 0.2 vs 0.75 * 1: the later one wins; P = 0.75 / 2, R = 0.75
    assert row["matches"][0] == {"optimal": [10, 10], "window": [7, 13], "match": 1, "s": 0.75, "s_time": 0.75, "s_acc": 1.0}
    assert row["precision"] == pytest.approx(0.375) and row["recall"] == pytest.approx(0.75)
    assert row["f1"] == pytest.approx(0.5) and row["time"] == 0.75 and row["acc"] == 1.0


def test_ties_keep_input_order_and_first_best():
    s = msample("OU", [{"time": 10, "text": "x"}])
    row = score_sample(s, [{"time": 10, "text": "a"}, {"time": 10, "text": "b"}], ONE)
    assert row["matches"][0]["match"] == 0 and [p["index"] for p in row["preds"]] == [0, 1]
    row = score_sample(s, [{"time": 12, "text": "late"}, {"time": 9, "text": "early"}], ONE)
    assert [p["time"] for p in row["preds"]] == [9, 12]  # time order, original indices kept
    assert row["matches"][0]["match"] == 1 and row["matches"][0]["s"] == 0.75


def test_prediction_in_two_windows_goes_to_first_gt_in_annotation_order():
    calls = []
    judge = lambda q, p, a: calls.append(a["text"]) or 1.0
    s = msample("OU", [{"time": 12, "text": "g0"}, {"time": 10, "text": "g1"}])
    row = score_sample(s, at(11), judge)
    assert calls == ["g0"]  # the judge is asked about the first window only
    assert row["matches"][0]["match"] == 0 and row["matches"][1]["match"] is None
    assert row["precision"] == 0.75 and row["recall"] == 0.375 and row["f1"] == pytest.approx(0.5)
    assert row["time"] == 0.375 and row["acc"] == 0.5  # the unmatched GT contributes 0 to both


def test_unmatched_predictions_count_and_judge_not_asked_outside_windows():
    calls = []
    row = score_sample(msample("OU", [{"time": 10, "text": "x"}]), at(10, 30),
                       lambda q, p, a: calls.append(p) or 1.0)
    assert len(calls) == 1 and row["n_pred"] == 2 and row["n_gt"] == 1
    assert row["precision"] == 0.5 and row["recall"] == 1.0 and row["f1"] == pytest.approx(2 / 3)
    assert row["preds"][1]["gt"] is None


def test_empty_sides():
    row = score_sample(msample("OU", [{"time": 10, "text": "x"}]), [], ONE)  # N_pred = 0
    assert (row["precision"], row["recall"], row["f1"], row["time"], row["acc"]) == (0, 0, 0, 0, 0)
    row = score_sample(msample("OU", []), at(5), ONE)  # N_gt = 0
    assert (row["precision"], row["recall"], row["f1"], row["n_pred"]) == (0, 0, 0, 1)
    row = score_sample(msample("OU", [{"time": 10, "text": "x"}]), at(10), lambda q, p, a: 0.0)  # P + R = 0
    assert row["f1"] == 0 and row["time"] == 1.0 and row["acc"] == 0.0


TG_FORMS = ["from 12s to 18s", "12.0-18.0 seconds", "00:12 to 00:18", "between 12 and 18", "12 s – 18 s",
            "start 12 end 18", "The event starts at 12s and ends at 18s.", "[12, 18]", "18 to 12"]


@pytest.mark.parametrize("text", TG_FORMS)
def test_tg_parsing_forms(text):
    assert parse_interval(text) == (12.0, 18.0)
    s = msample("TG", [{"start": 10, "end": 20, "text": "x"}])  # IoU of [12, 18] with [10, 20] = 6 / 10
    assert score_sample(s, [{"time": 20, "text": text}], None)["f1"] == pytest.approx(0.6)


def test_tg_parsing_more():
    assert parse_interval("0:01:05 to 0:01:10") == (65.0, 70.0)
    assert parse_interval("2 people walk from 12 to 18") == (12.0, 18.0)
    for bad in ["no numbers here", "at 12s", "1218"]:
        assert parse_interval(bad) is None
    s = msample("TG", [{"start": 10, "end": 20, "text": "x"}])
    row = score_sample(s, [{"time": 20, "text": "somewhere in the middle"}], None)
    assert row["f1"] == 0 and row["time"] == 1.0 and row["acc"] == 0.0
    assert score_sample(s, [{"time": 20, "text": "from 5s to 15s"}], None)["f1"] == pytest.approx(1 / 3)


def test_iou_edge_cases():
    assert iou((3, 3), (3, 3)) == 1.0
    assert iou((3, 3), (2, 4)) == 0.0 and iou((5, 5), (6, 6)) == 0.0
    assert iou((2, 4), (3, 5)) == pytest.approx(1 / 3) and iou((0, 1), (2, 3)) == 0.0


def test_response_turns():
    row = score_sample(msample("OU", [], query_time=2.3, duration=10.5), at(4, 5, 6), ONE)
    assert row["turns"] == 9  # turns 2..10: ceil(10.5) - floor(2.3)
    assert aggregate([row])["response_rate"] == pytest.approx(3 / 9)
    assert "turns" not in score_sample(msample("OU", []), [], ONE)


# -----------------------------------------------------------------------------
# metric.py: aggregate


def row(task, f1, **kw):
    return {"task": task, "f1": f1, "precision": kw.get("p", f1), "recall": kw.get("r", f1), "time": kw.get("t", 0.0),
            "acc": kw.get("a", 0.0), "n_pred": 1}


def test_aggregate_paper_check_and_weighting():
    rows = [row("EU", 0.40), row("AA", 0.50), row("TP", 0.444), row("RF", 0.076), row("GP", 0.076), row("GP", 0.076)]
    out = aggregate(rows)
    assert {d: round(100 * m["f1"], 1) for d, m in out["dims"].items()} == {"PU": 45.0, "TR": 44.4, "PA": 7.6}
    assert round(100 * out["avg"], 1) == 32.3  # (45.0 + 44.4 + 7.6) / 3
    assert out["w_avg"] == pytest.approx((0.9 + 0.444 + 0.228) / 6)
    assert out["tasks"]["GP"]["n"] == 2 and list(out["tasks"]) == ["EU", "AA", "TP", "GP", "RF"]


def test_aggregate_mixed_set():
    rows = [row("EU", 1.0, t=1.0, a=0.5), row("EU", 0.0), row("OU", 0.5), row("TP", 0.8), row("GP", 0.2),
            row("narration", 0.9)]
    out = aggregate(rows)
    assert out["tasks"]["EU"] == {"n": 2, "time": 0.5, "acc": 0.25, "precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert out["dims"]["PU"]["f1"] == pytest.approx(0.5) and out["dims"]["PU"]["n"] == 3  # by sample, not by task
    assert out["avg"] == pytest.approx((0.5 + 0.8 + 0.2) / 3)
    assert out["w_avg"] == pytest.approx(3.4 / 6)  # the unknown task counts here, in no dimension
    assert "narration" in out["tasks"] and list(out["tasks"])[-1] == "narration"
    out = aggregate([row("EU", 0.6), row("TP", 0.2)])  # PA missing: left out of Avg
    assert set(out["dims"]) == {"PU", "TR"} and out["avg"] == pytest.approx(0.4)
    assert aggregate([row("REC", 0.5)])["avg"] is None and aggregate([])["w_avg"] == 0.0


# -----------------------------------------------------------------------------
# metric.py: offline judge

VOCAB_SAMPLES = [msample("OU", [{"time": 1, "text": "", "slots": s} for s in (
    {"colour": "red", "pos": "top-left"}, {"colour": "dark red", "pos": "bottom right"}, {"colour": "blue"},
    {"count": 12}, {"count": 2})])]


def test_offline_judge_slots():
    j = OfflineJudge.from_samples(VOCAB_SAMPLES)
    red = {"text": "The square turned red.", "slots": {"colour": "red"}}
    assert j(None, "The square turned RED!", red) == 1.0
    assert j(None, "it turned red, then blue", red) == 0.0  # a conflicting value of the same key
    assert j(None, "it is dark red now", red) == 0.0  # "red" only inside another known value
    assert j(None, "it is dark red now", {"text": "", "slots": {"colour": "dark red"}}) == 1.0
    assert j(None, "reddish", red) == 0.0  # whole words only
    assert j(None, "at the Top Left corner", {"text": "", "slots": {"pos": "top-left"}}) == 1.0
    assert j(None, "it happened 12.0 times", {"text": "", "slots": {"count": 12}}) == 1.0
    assert j(None, "112 times", {"text": "", "slots": {"count": 12}}) == 0.0
    assert j(None, "2 or 12", {"text": "", "slots": {"count": 12}}) == 0.0
    two = {"text": "", "slots": {"colour": "red", "pos": "top-left"}}
    assert j(None, "red, at the bottom right", two) == 0.5  # mean over slots
    assert j.reports("red, top left", two) and not j.reports("red", two)
    done = {"text": "The goal is reached.", "slots": {"event": "done"}}  # a text that omits its slot value
    assert j(None, "the goal is reached", done) == 1.0 and j(None, "Goal reached!", done) == 0.0


def test_offline_judge_free_text():
    j = OfflineJudge()
    # content words {dog, runs, fast} vs {dog, runs}: F1 = 2 * 2 / (3 + 2)
    assert j(None, "The dog runs fast", {"text": "A dog runs."}) == pytest.approx(0.8)
    assert j(None, "the", {"text": "a"}) == 1.0 and j(None, "", {"text": "dog"}) == 0.0


# -----------------------------------------------------------------------------
# metric.py: HTTP judge against a local stub server


class Stub:
    """An OpenAI-compatible stub on 127.0.0.1: respond(request_json) -> (status, body text)."""

    def __init__(self, respond):
        self.requests, stub = [], self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, text = respond(body)
                self.send_response(status)
                self.end_headers()
                self.wfile.write(text.encode())

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def chat(content):
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})


def scripted(*replies):
    """Replies in order; the last one repeats."""
    queue = list(replies)
    return lambda body: queue.pop(0) if len(queue) > 1 else queue[0]


KEY = "sk-test-SECRET-123"


def test_http_judge_retry_cache_and_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    stub = Stub(scripted((500, "boom"), (200, chat('```json\n{"explanation": "ok", "score": "4"}\n```'))))
    try:
        cache = tmp_path / "cache.jsonl"
        judge = HTTPJudge(stub.url, "m", api_key_env="TEST_JUDGE_KEY", cache_path=str(cache), backoff=0.01)
        assert judge("Q?", "pred", {"text": "ref"}) == 0.8
        assert len(stub.requests) == 2 and stub.requests[1]["path"] == "/v1/chat/completions"
        assert stub.requests[1]["auth"] == "Bearer " + KEY and stub.requests[1]["body"]["model"] == "m"
        prompt = stub.requests[1]["body"]["messages"][0]["content"]
        assert "Q?" in prompt and "pred" in prompt and "ref" in prompt
        assert judge("Q?", "pred", {"text": "ref"}) == 0.8 and len(stub.requests) == 2  # cache hit
        again = HTTPJudge(stub.url, "m", api_key_env="TEST_JUDGE_KEY", cache_path=str(cache))
        assert again("Q?", "pred", {"text": "ref"}) == 0.8 and len(stub.requests) == 2  # from the file
        assert again("Q?", "other", {"text": "ref"}) == 0.8 and len(stub.requests) == 3
        assert HTTPJudge(stub.url, "m2", cache_path=str(cache))("Q?", "pred", {"text": "ref"}) == 0.8
        assert len(stub.requests) == 4  # the model is part of the key
        assert len(cache.read_text().splitlines()) == 3 and KEY not in cache.read_text()
    finally:
        stub.close()
    out = capsys.readouterr()
    assert KEY not in out.out + out.err


def test_http_judge_cache_survives_a_cut_line(tmp_path):
    stub = Stub(scripted((200, chat('{"explanation": "x", "score": 2}'))))
    try:
        cache = tmp_path / "cache.jsonl"
        cache.write_text('{"key": "abc", "kind": "judge", "val')  # an interrupted write, no newline
        assert HTTPJudge(stub.url, "m", cache_path=str(cache))("Q?", "p", {"text": "r"}) == 0.4
        assert HTTPJudge(stub.url, "m", cache_path=str(cache))("Q?", "p", {"text": "r"}) == 0.4
        assert len(stub.requests) == 1 and len(cache.read_text().splitlines()) == 2
    finally:
        stub.close()


def test_http_judge_malformed_reply_then_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    stub = Stub(scripted((200, chat("It looks fine to me."))))
    try:
        judge = HTTPJudge(stub.url, "m", api_key_env="TEST_JUDGE_KEY", retries=2, backoff=0.01)
        with pytest.raises(JudgeError) as e:
            judge("Q?", "pred", {"text": "ref"})
        assert len(stub.requests) == 3 and stub.url + "/chat/completions" in str(e.value)
        assert "no usable reply" in str(e.value) and KEY not in str(e.value)
    finally:
        stub.close()
    assert KEY not in "".join(capsys.readouterr())


def test_http_judge_client_error_fails_at_once_without_the_key(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    stub = Stub(lambda body: (401, "bad key: " + KEY))  # a server that echoes the key back
    try:
        with pytest.raises(JudgeError) as e:
            HTTPJudge(stub.url, "m", api_key_env="TEST_JUDGE_KEY", backoff=0.01)("Q?", "p", {"text": "r"})
        assert len(stub.requests) == 1 and "HTTP 401" in str(e.value) and KEY not in str(e.value)
    finally:
        stub.close()


def test_http_judge_429_retried_and_prefetch(tmp_path):
    stub = Stub(scripted((429, "slow down"), (200, chat('{"explanation": "x", "score": 5}'))))
    try:
        judge = HTTPJudge(stub.url + "/chat/completions", "m", api_key_env="NO_SUCH_ENV_VAR", backoff=0.01,
                          concurrency=4)
        items = [("Q?", f"p{k}", {"text": "r"}) for k in range(5)] + [("Q?", "p0", {"text": "r"}), ("Q?", " ", {"text": "r"})]
        assert judge.prefetch(items) == 5  # duplicates and empty replies are not sent
        assert len(stub.requests) == 6 and stub.requests[0]["auth"] is None  # one 429, then 5
        assert [judge("Q?", f"p{k}", {"text": "r"}) for k in range(5)] == [1.0] * 5 and len(stub.requests) == 6
        assert judge("Q?", "", {"text": "r"}) == 0.0 and len(stub.requests) == 6
    finally:
        stub.close()


def test_parse_score_and_urls():
    assert metric.parse_score('Sure!\n```json\n{"explanation": "a", "score": 3}\n```') == 3
    assert metric.parse_score('{"explanation": "a", "score": "5"}') == 5
    assert metric.parse_score("The score: 4 because ...") == 4
    assert metric.parse_score('{"score": 7}') == 5 and metric.parse_score('{"score": -2}') == 0
    with pytest.raises(metric.ReplyError):
        metric.parse_score('{"explanation": "no number"}')
    assert metric.chat_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert metric.chat_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert metric.chat_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


# -----------------------------------------------------------------------------
# rewards.py


def test_format_reward():
    f = rewards.format_reward
    assert f(["</Silence>"]) == 1 and f(["  </Silence>\n"]) == 1 and f(["</Silence><|im_end|>"]) == 1
    assert f(["</Response> The square turned red."]) == 1 and f(["</Response> red <|im_end|>"]) == 1
    assert f(["</Response>"]) == 0 and f(["</Response>   <|im_end|>"]) == 0
    assert f(["garbage"]) == 0 and f(["</Silence> extra"]) == 0 and f(["</Response> x </Silence>"]) == 0
    assert f(["</Standby>"]) == 0 and f(["</Standby>"], states=3) == 1
    mixed = ["</Silence>", "</Response> hi", "bad", "</Standby>"]
    assert f(mixed) == 0.5 and f(mixed, states=3) == 0.75 and f([]) == 0.0


def test_turn_f1_one_sided_pa_window():
    g = [{"time": 10, "text": "x"}]
    after, before = at(14), at(6)
    assert rewards.turn_f1_reward(msample("OU", g), after, ONE) == pytest.approx(1.5)  # 2 * (0.5 + 1) / 2
    for task in ("GP", "RF"):
        assert rewards.turn_f1_reward(msample(task, g), after, ONE) == 0.0  # after t_g: never matched
        assert rewards.turn_f1_reward(msample(task, g), before, ONE) == pytest.approx(1.5)
    assert rewards.turn_f1_reward(msample("OU", g), at(18), ONE) == pytest.approx(1.0)  # edge t_g + tau: S' = 0 + 1
    assert rewards.turn_f1_reward(msample("OU", g), at(18.01), ONE) == 0.0


def test_turn_f1_matching():
    good = [{"time": 10, "text": "good"}]
    preds = [{"time": 9, "text": "bad"}, {"time": 12, "text": "good"}]
    # the better later prediction wins: S' = 0.75 + 1 against 0.875 + 0
    assert rewards.turn_f1_reward(msample("OU", good), preds, SAME) == pytest.approx(2 * 1.75 / 3)
    two = [{"time": 10, "text": "x"}, {"time": 12, "text": "x"}]
    assert rewards.turn_f1_reward(msample("OU", two), at(11), ONE) == pytest.approx(2 * 1.875 / 3)  # shared: one GT only
    assert rewards.turn_f1_reward(msample("OU", two), at(10, 12), ONE) == pytest.approx(2.0)  # the maximum
    # a tie keeps the earlier candidate: GT0 takes 9 (not 11), GT1 then gets 11: 1.875 + 1.75
    assert rewards.turn_f1_reward(msample("OU", [{"time": 10, "text": "x"}, {"time": 13, "text": "x"}]),
                                  at(9, 11), ONE) == pytest.approx(2 * 3.625 / 4)
    # S' = 0 is never matched, so the prediction stays free for the next GT
    gts = [{"time": 10, "text": "a"}, {"time": 20, "text": "b"}]
    assert rewards.turn_f1_reward(msample("OU", gts), [{"time": 18, "text": "b"}], SAME) == pytest.approx(2 * 1.75 / 3)
    interval = [{"start": 2, "end": 10, "text": "x"}]  # t_g = end
    assert rewards.turn_f1_reward(msample("EU", interval), at(10), ONE) == 2.0
    assert rewards.turn_f1_reward(msample("EU", interval), at(2), ONE) == 1.0
    tg = msample("TG", [{"start": 10, "end": 20, "text": "x"}])
    assert rewards.turn_f1_reward(tg, [{"time": 20, "text": "from 12s to 18s"}], None) == pytest.approx(1.6)
    assert rewards.turn_f1_reward(msample("OU", []), [], ONE) == 0.0
    assert rewards.turn_f1_reward(msample("OU", []), at(3), ONE) == 0.0
    assert rewards.turn_f1_reward(msample("OU", good), [], ONE) == 0.0


def test_rubric_and_total_reward():
    marks = lambda s, r, item: item["mark"]
    s = msample("OU", [{"time": 10, "text": "good"}], rubric=[{"mark": 1}, {"mark": 0}, {"mark": 1}])
    assert rewards.rubric_reward(s, [], marks) == pytest.approx(2 / 3)
    assert rewards.rubric_reward(msample("OU", []), [], marks) == 0.0
    steps, resp = ["</Silence>", "</Response> good"], [{"time": 10, "text": "good"}]
    out = rewards.total_reward(s, steps, resp, SAME, marks)  # 0.1 * 1 + 0.45 * 2 + 0.45 * 2/3
    assert out == pytest.approx({"total": 1.3, "format": 1.0, "turn": 2.0, "traj": 2 / 3})
    no_rubric = {k: v for k, v in s.items() if k != "rubric"}
    assert rewards.total_reward(no_rubric, steps, resp, SAME, marks) == pytest.approx(
        {"total": 1.0, "format": 1.0, "turn": 2.0, "traj": None})
    boom = lambda *a: 1 / 0  # w_traj = 0: the evaluator is never asked
    out = rewards.total_reward(s, ["bad", "</Silence>"], resp, SAME, boom, w_fmt=0.2, w_turn=0.8, w_traj=0)
    assert out["total"] == pytest.approx(0.2 * 0.5 + 0.8 * 2.0)


COLOURS = ("red", "blue", "green", "yellow")


def colour_sample(n, query_time=2.0):
    answers = [{"time": 10.0 * (i + 1), "text": f"The square turned {c}.", "slots": {"colour": c}}
               for i, c in zip(range(n), COLOURS * 3)]
    return msample("OU", answers, "Tell me when the square changes colour.", query_time, duration=10.0 * n + 10)


def test_offline_rubric_counts():
    for n, count in [(0, 6), (1, 6), (2, 7), (3, 8), (5, 10), (6, 10), (9, 10)]:
        items = rewards.offline_rubric(colour_sample(n))
        assert len(items) == count, n
        assert all(set(it) == {"rubric_id", "dimension", "rubric", "check"} for it in items)
        assert len({it["rubric_id"] for it in items}) == count
        if n:
            assert {it["dimension"] for it in items} == {"granularity", "coherence", "coverage"}
    items = rewards.offline_rubric(colour_sample(3))
    assert "The square turned blue" in items[1]["rubric"] and items[1]["check"] == {"type": "covers", "answer": 1}


def test_offline_evaluator_marks():
    s = colour_sample(3)  # red at 10, blue at 20, green at 30; items: 3 covers, hallucination, max 4, dup, order, merge
    judge = OfflineJudge.from_samples([s, msample("OU", [{"time": 1, "text": "", "slots": {"colour": "yellow"}}])])
    ev, items = rewards.OfflineEvaluator(judge), rewards.offline_rubric(s)
    marks = lambda rs: [ev(s, rs, it) for it in items]
    say = lambda *tc: [{"time": t, "text": f"The square is {c} now"} for t, c in tc]
    assert marks(say((10, "red"), (20, "blue"), (30, "green"))) == [1] * 8
    assert marks(say((10, "red"), (20, "blue"), (25, "yellow"), (30, "green"))) == [1, 1, 1, 0, 1, 1, 1, 1]
    assert marks(say((10, "red"), (15, "red"), (20, "blue"), (30, "green"))) == [1, 1, 1, 1, 1, 0, 1, 1]
    assert marks(say((10, "blue"), (20, "red"), (30, "green"))) == [1, 1, 1, 1, 1, 1, 0, 1]
    assert marks(say((10, "red"), (30, "green"))) == [1, 0, 1, 1, 1, 1, 1, 1]
    assert marks(say((1, "red"), (20, "blue"), (30, "green"))) == [0, 1, 1, 1, 1, 1, 1, 1]  # before the question
    assert marks(say((5, "red"), (10, "red"), (20, "blue"), (25, "blue"), (30, "green"))) == [1, 1, 1, 1, 0, 0, 1, 1]
    merged = [{"time": 20, "text": "red and then blue"}, {"time": 30, "text": "green"}]
    assert marks(merged) == [0, 0, 1, 0, 1, 1, 1, 0]  # a conflicting slot: reports neither, and merges two events
    one = colour_sample(1)  # 1 covers, hallucination, max 2, dup, after-question, timely
    items1 = rewards.offline_rubric(one)
    assert [ev(one, say((12, "red")), it) for it in items1] == [1] * 6
    assert [ev(one, say((1, "red"), (19, "red")), it) for it in items1] == [1, 1, 1, 0, 0, 0]
    # staying silent when there is something to report earns no item, not even the vacuous ones (ours)
    assert marks([]) == [0] * 8 and marks(say((15, "yellow"))) == [0] * 8
    silent = colour_sample(0)
    assert [ev(silent, [], it) for it in rewards.offline_rubric(silent)] == [1] * 6
    assert [ev(silent, say((3, "red")), it) for it in rewards.offline_rubric(silent)] == [0, 0, 1, 1, 0, 1]


def test_llm_evaluator_and_parsers():
    stub = Stub(scripted((200, chat('{"explanation": "fine", "mark": 1}'))))
    try:
        ev = rewards.LLMEvaluator(stub.url, "m", backoff=0.01)
        s = colour_sample(2)
        assert ev(s, [{"time": 10, "text": "red"}], {"rubric": "The assistant reports red."}) == 1
        prompt = stub.requests[0]["body"]["messages"][0]["content"]
        assert "[10s] red" in prompt and "The assistant reports red." in prompt and "The square turned blue." in prompt
    finally:
        stub.close()
    assert rewards.parse_mark('```{"mark": "0"}```') == 0 and rewards.parse_mark('{"mark": true}') == 1
    with pytest.raises(metric.ReplyError):
        rewards.parse_mark('{"mark": 3}')
    good = json.dumps([{"rubric_id": f"r{k}", "dimension": "coverage", "rubric": "x"} for k in range(6)])
    assert len(rewards.parse_rubric("Here:\n" + good)) == 6
    with pytest.raises(metric.ReplyError):
        rewards.parse_rubric(json.dumps(json.loads(good)[:5]))


def write_ann(path, samples):
    path.write_text("".join(json.dumps({"video": "v.mp4", **s}) + "\n" for s in samples))
    return str(path)


def test_make_rubrics_resumable(tmp_path):
    ann = write_ann(tmp_path / "train.jsonl", [{**colour_sample(2), "id": f"id{k}"} for k in range(3)])
    fail = {"on": True}
    items = json.dumps([{"rubric_id": f"r{k}", "dimension": d, "rubric": "The assistant reports red."}
                        for k, d in enumerate(["coverage", "coherence", "granularity"] * 2)])

    def respond(body):
        bad = fail["on"] and "at 10s" in body["messages"][0]["content"] and "Q-two" in body["messages"][0]["content"]
        return 200, chat("no list here" if bad else items)

    samples = [{**colour_sample(2), "id": f"id{k}", "question": q} for k, q in enumerate(["Q-zero", "Q-one", "Q-two"])]
    ann = write_ann(tmp_path / "train.jsonl", samples)
    stub = Stub(respond)
    try:
        client = metric.ChatClient(stub.url, "m", retries=1, backoff=0.01, concurrency=3)
        n, failed = rewards.make_rubrics(ann, client)
        out = tmp_path / "train.rubrics.jsonl"
        assert n == 2 and [f[0] for f in failed] == ["id2"] and len(out.read_text().splitlines()) == 2
        before = len(stub.requests)  # 2 good + 2 attempts for id2
        fail["on"] = False
        n, failed = rewards.make_rubrics(ann, client)
        assert n == 1 and failed == [] and len(stub.requests) == before + 1  # only the missing id is asked
        lines = [json.loads(l) for l in out.read_text().splitlines()]
        assert sorted(l["id"] for l in lines) == ["id0", "id1", "id2"] and len(lines[0]["rubric"]) == 6
    finally:
        stub.close()
    loaded = rewards.load_rubrics(ann, load_annotations(ann, check_videos=False))
    assert all(len(s["rubric"]) == 6 for s in loaded)
    other = write_ann(tmp_path / "val.jsonl", samples[:1])
    assert len(rewards.load_rubrics(other, load_annotations(other, check_videos=False))[0]["rubric"]) == 7  # offline
    assert rewards.make_rubrics(other)[0] == 1 and rewards.make_rubrics(other)[0] == 0  # --offline, resumable


# -----------------------------------------------------------------------------
# bench.py


def bench_ann(tmp_path):
    red, blue = ({"colour": c} for c in ("red", "blue"))
    return write_ann(tmp_path / "test.jsonl", [
        {"id": "ou", "task": "OU", "question": "When does it change?", "query_time": 0.0, "duration": 40.0,
         "answers": [{"time": 10.0, "text": "It turned red.", "slots": red}, {"time": 25.0, "text": "It turned blue.", "slots": blue}]},
        {"id": "tg", "task": "TG", "question": "When is the jump?", "query_time": 1.0, "duration": 30.0,
         "answers": [{"start": 5.5, "end": 12.0, "text": "the jump"}]},
        {"id": "eu", "task": "EU", "question": "What happens?", "query_time": 0.0, "duration": 30.0,
         "answers": [{"start": 3.0, "end": 9.0, "text": "A ball rolls across the table."}]},
        {"id": "rf", "task": "RF", "question": "Warn me.", "query_time": 0.0, "duration": 20.0,
         "answers": [{"time": 7.0, "text": "Careful, a step ahead.", "slots": {"hazard": "step"}}]},
        {"id": "one", "task": "OU", "question": "When does it turn red?", "query_time": 0.0, "duration": 5.0,
         "answers": [{"time": 3.0, "text": "It turned red.", "slots": red}]},
    ])


def test_bench_baselines(tmp_path):
    ann = bench_ann(tmp_path)
    res = bench.main(["--ann", ann, "--baseline", "oracle", "--out", str(tmp_path / "oracle.preds.jsonl")])
    assert res["summary"]["w_avg"] == 1.0 and res["summary"]["avg"] == 1.0 and res["missing"] == 0
    assert json.loads((tmp_path / "oracle.preds.results.json").read_text())["summary"]["tasks"]["TG"]["f1"] == 1.0
    res = bench.main(["--ann", ann, "--baseline", "silent", "--out", str(tmp_path / "silent.preds.jsonl")])
    assert res["summary"]["w_avg"] == 0.0 and res["summary"]["response_rate"] == 0.0
    res = bench.main(["--ann", ann, "--baseline", "every-turn", "--out", str(tmp_path / "every.preds.jsonl")])
    one = next(r for r in res["rows"] if r["id"] == "one")  # 5 responses at 1..5, GT at 3: P 1/5, R 1
    assert one["n_pred"] == 5 and one["f1"] == pytest.approx(1 / 3)
    assert res["summary"]["response_rate"] == 1.0 and res["summary"]["n_turns"] == 40 + 29 + 30 + 20 + 5
    r1 = bench.main(["--ann", ann, "--baseline", "random", "--p", "1.0", "--out", str(tmp_path / "r1.preds.jsonl")])
    assert next(r for r in r1["rows"] if r["id"] == "one")["f1"] == pytest.approx(1 / 3)  # p = 1, one reference text
    r2 = bench.main(["--ann", ann, "--baseline", "random", "--seed", "3", "--out", str(tmp_path / "r2.preds.jsonl")])
    r3 = bench.main(["--ann", ann, "--baseline", "random", "--seed", "3", "--out", str(tmp_path / "r3.preds.jsonl")])
    assert (tmp_path / "r2.preds.jsonl").read_text() == (tmp_path / "r3.preds.jsonl").read_text()
    assert 0 < r2["summary"]["n_responses"] < 124 and r2["summary"] == r3["summary"]


def test_bench_preds_file_errors_and_missing(tmp_path, capsys):
    ann = bench_ann(tmp_path)
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "one", "responses": [{"time": 3.0, "text": "It turned red."}]}) + "\n")
    res = bench.main(["--ann", ann, "--preds", str(preds)])
    assert res["missing"] == 4 and res["summary"]["w_avg"] == pytest.approx(1 / 5)
    assert "4 missing from the predictions, scored as silent" in capsys.readouterr().out
    preds.write_text(json.dumps({"id": "one", "responses": []}) + "\n" + json.dumps({"id": "nope", "responses": []}) + "\n")
    with pytest.raises(bench.BenchError, match=r"p\.jsonl:2: id 'nope' is not in the annotations"):
        bench.main(["--ann", ann, "--preds", str(preds)])
    preds.write_text('{"id": "one", "responses": [{"time": "3", "text": "x"}]}\n')
    with pytest.raises(bench.BenchError, match=r"p\.jsonl:1: responses\[0\]"):
        bench.main(["--ann", ann, "--preds", str(preds)])
    preds.write_text('\n{"id": "one", "responses": [}\n')
    with pytest.raises(bench.BenchError, match=r"p\.jsonl:2: not valid JSON"):
        bench.main(["--ann", ann, "--preds", str(preds)])


def test_bench_show_and_default_ann(tmp_path, monkeypatch):
    ann = bench_ann(tmp_path)
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "ou", "responses": [{"time": 11.0, "text": "It is red"},
                                                           {"time": 30.0, "text": "blue"}]}) + "\n")
    text = bench.main(["--ann", ann, "--preds", str(preds), "--show", "ou"])
    assert "G0: t_opt 10s  window [7, 13]s  best P0: S 0.75 = S_time 0.75 x S_acc 1.00" in text
    assert "P0 at 11s -> G0  S_time 0.75  S_acc 1.00" in text and "P1 at 30s -> no window (unmatched)" in text
    assert "G1: t_opt 25s  window [22, 28]s  no match" in text
    monkeypatch.chdir(tmp_path)
    with pytest.raises(bench.BenchError, match="python synthetic.py"):
        bench.main(["--baseline", "oracle"])


def test_bench_http_judge_end_to_end(tmp_path):
    stub = Stub(scripted((200, chat('{"explanation": "right", "score": 5}'))))
    try:
        ann = bench_ann(tmp_path)
        res = bench.main(["--ann", ann, "--baseline", "oracle", "--out", str(tmp_path / "o.preds.jsonl"), "--judge", "http",
                          "--judge_url", stub.url, "--judge_model", "m", "--judge_cache", str(tmp_path / "c.jsonl")])
        assert res["summary"]["w_avg"] == 1.0 and len(stub.requests) == 5  # 6 answers, TG needs no judge
    finally:
        stub.close()


OVO_ITEMS = [
    {"id": 1, "task": "REC", "video": "perception_test/a.mp4", "activity": "jumping", "start_times": [2, 9],
     "end_times": [5, 12], "test_info": [{"realtime": 5, "count": 1}, {"realtime": 12, "count": 2}]},
    {"id": 2, "task": "SSR", "video": "COIN/b.mp4", "tutorial": "MakeTea", "all_steps": ["boil water", "pour water"],
     "start_time": [3, 20], "end_time": [15, 26], "test_info": [{"realtime": 10, "step": "boil water", "type": 1}]},
    {"id": 3, "task": "CRR", "video": "MovieNet/c.mp4", "question": "What does she take?", "answer": "A red cup.",
     "ask_time": 30, "clue_time": 41, "test_info": [{"realtime": 30, "type": 0}, {"realtime": 45, "type": 1}]},
    {"id": 4, "task": "EPM", "video": "x.mp4", "question": "?"},
]


def test_ovo_converter(tmp_path):
    src, dst = tmp_path / "ovo.json", tmp_path / "far.jsonl"
    src.write_text(json.dumps(OVO_ITEMS))
    assert formats.main(["--from_ovo", str(src), "--out", str(dst)]) == {"REC": 1, "SSR": 1, "CRR": 1}
    by_id = {s["id"]: s for s in load_annotations(str(dst), check_videos=False)}
    assert by_id["ovo_REC_1"]["answers"] == [{"time": 5.0, "text": "1", "slots": {"count": 1}},
                                             {"time": 12.0, "text": "2", "slots": {"count": 2}}]
    assert "jumping" in by_id["ovo_REC_1"]["question"] and by_id["ovo_REC_1"]["query_time"] == 0.0
    assert by_id["ovo_SSR_2"]["answers"][1] == {"start": 20.0, "end": 26.0, "text": "pour water"}
    assert "make tea" in by_id["ovo_SSR_2"]["question"]
    assert by_id["ovo_CRR_3"]["query_time"] == 30.0 and by_id["ovo_CRR_3"]["answers"] == [{"time": 41.0, "text": "A red cup."}]
    assert by_id["ovo_CRR_3"]["video"] == "MovieNet/c.mp4" and "ovo_EPM_4" not in by_id
    res = bench.main(["--ann", str(dst), "--baseline", "oracle", "--out", str(tmp_path / "o.preds.jsonl")])
    assert res["summary"]["w_avg"] == 1.0 and res["summary"]["avg"] is None
    src.write_text(json.dumps([{"id": 9, "task": "SSR", "video": "v", "tutorial": "T", "all_steps": ["a"],
                                "start_time": [1, 2], "end_time": [3, 4]}]))
    with pytest.raises(formats.FormatError, match="OVO item id 9"):
        formats.ovo_to_annotations(json.loads(src.read_text()))


def test_random_scoring_samples_shape():
    samples, preds = bench.random_samples(50, seed=1)
    assert all(2 <= len(s["answers"]) <= 4 and 2 <= len(preds[s["id"]]) <= 6 for s in samples)


# -----------------------------------------------------------------------------
# Real data formats (formats.py): Streamo-Instruct in, StreamingBench's proactive task in and its own rule

import formats  # noqa: E402

# Streamo's two formats, hand-made in the structure of its dataset/example/ files (raw_data.json and
# stream_format.json): a question at "5" with an interval answer (Standby), one at 3 with an instant answer
# as a float string, and one sample with two questions (no repeat on <0s-1s>: its first question is there).
STREAMO_RAW = [
    {"video_name": "v_a.mp4", "video_path": "clips/v_a.mp4", "task_type": "QA", "source": "fixture",
     "question": [{"content": "What is on the poster?", "time": "5"}],
     "response": [{"content": "A film title.", "st_time": 5.0, "end_time": 6.0, "time": ""}]},
    {"video_name": "v_b.mp4", "video_path": "clips/v_b.mp4", "task_type": "QA", "source": "fixture",
     "question": [{"content": "What does he hold?", "time": 3}],
     "response": [{"content": "A microphone.", "st_time": "", "end_time": "", "time": "8.6"}]},
    {"video_name": "v_c.mp4", "video_path": "clips/v_c.mp4", "task_type": "narration", "source": "fixture",
     "question": [{"content": "Count the jumps.", "time": "1"}, {"content": "What does the car do?", "time": "6"}],
     "response": [{"content": "One.", "time": "3"}, {"content": "It turns left.", "st_time": "6", "end_time": "7", "time": ""},
                  {"content": "It stops.", "time": 10}]},
]
S_, B_, R_ = "</Silence>", "</Standby>", "</Response> "
STREAMO_TURNS = [  # (turns, questions by turn, assistant labels): what Streamo's converter writes for STREAMO_RAW
    (10, {0: "What is on the poster?", 4: "What is on the poster?"},
     [S_, S_, S_, S_, B_, B_, R_ + "A film title.", S_, S_, S_]),
    (10, {0: "What does he hold?", 2: "What does he hold?"},
     [S_, S_, S_, S_, S_, S_, S_, R_ + "A microphone.", S_, S_]),
    (12, {0: "Count the jumps.", 5: "What does the car do?"},
     [S_, S_, R_ + "One.", S_, S_, B_, B_, R_ + "It turns left.", S_, R_ + "It stops.", S_, S_]),
]


def streamo_stream(raw, n, questions, labels):
    msgs = [{"role": "system", "content": "\nYou are a helpful assistant specializing in streaming video analysis.\n"}]
    for k in range(n):
        q = questions.get(k)
        msgs += [{"role": "user", "content": (f"{q}\n" if q else "") + f"<{k}s-{k + 1}s>\n<stream>"},
                 {"role": "assistant", "content": labels[k]}]
    return {"messages": msgs, "videos": [raw["video_path"]], "video_name": raw["video_name"],
            "task_type": raw["task_type"], "source": raw["source"]}


def test_streamo_converter_reproduces_streamo_labels(tmp_path):
    """Both formats convert, and our 3-state conversations give Streamo's assistant messages turn by turn."""
    stream = [streamo_stream(r, *t) for r, t in zip(STREAMO_RAW, STREAMO_TURNS)]
    for r, (n, _, labels) in zip(STREAMO_RAW, STREAMO_TURNS):  # our reading of Streamo's converter agrees with its output
        assert formats.streamo_labels(formats.raw_turns(r)[1], n) == labels
    for name, items in (("raw", STREAMO_RAW), ("stream", stream)):
        src, dst = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
        src.write_text(json.dumps(items, indent=1))
        assert formats.from_streamo(str(src), str(dst)) == {"samples": 4, "sources": 3, "split": 1, "skipped": {}}
        samples = load_annotations(str(dst), check_videos=False)
        assert [s["id"] for s in samples] == ["v_a_0_q0", "v_b_1_q0", "v_c_2_q0", "v_c_2_q1"]
        a, b, c0, c1 = samples
        assert a["query_time"] == 4.0 and a["answers"] == [{"start": 4.0, "end": 7.0, "text": "A film title."}]
        assert b["query_time"] == 2.0 and b["answers"] == [{"time": 8.0, "text": "A microphone."}]
        assert [x["text"] for x in c0["answers"]] == ["One."] and c1["query_time"] == 5.0
        assert [x["text"] for x in c1["answers"]] == ["It turns left.", "It stops."]
        assert a["video"] == "clips/v_a.mp4" and ("duration" in a) == (name == "stream")
        for group, (n, _, labels) in zip([[a], [b], [c0, c1]], STREAMO_TURNS):
            ours = [S_] * n
            for s in group:
                for t in data.build_conversation(s, n, states=3)["turns"]:
                    if t["decision"] != S_:
                        assert ours[t["k"]] == S_
                        ours[t["k"]] = t["target"]
            assert [data.split_decision(x) for x in ours] == [data.split_decision(x) for x in labels], group[0]["id"]


def test_streamo_converter_skips_with_reasons(tmp_path, capsys):
    (tmp_path / "videos" / "clips").mkdir(parents=True)
    (tmp_path / "videos" / "clips" / "v_a.mp4").write_bytes(b"")
    late_q = {"video_path": "clips/v_a.mp4", "question": [{"content": "A?", "time": "2"}, {"content": "B?", "time": "8"}],
              "response": [{"content": "b", "st_time": "4", "end_time": "9", "time": ""}]}  # Standby for B before B
    early = {"video_path": "clips/v_a.mp4", "question": [{"content": "A?", "time": "8"}],
             "response": [{"content": "a", "st_time": "3", "end_time": "9", "time": ""}]}  # shown on <0s-1s>: asked at 0
    same_turn = {"video_path": "clips/v_a.mp4", "question": [{"content": "A?", "time": "2"}, {"content": "B?", "time": 2.5}],
                 "response": []}
    overwritten = {"video_path": "clips/v_a.mp4", "question": [{"content": "A?", "time": "1"}],
                   "response": [{"content": "a", "time": "6"}, {"content": "b", "st_time": "4", "end_time": "7"}]}
    missing = dict(STREAMO_RAW[1], video_path="clips/nowhere.mp4")
    dangling = streamo_stream(STREAMO_RAW[0], 4, {0: "Q?"}, [S_, B_, B_, S_])
    items = [STREAMO_RAW[0], late_q, early, same_turn, overwritten, missing, dangling, 7]
    src, dst = tmp_path / "mixed.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, items)  # JSON lines are read too
    res = formats.from_streamo(str(src), str(dst), video_root=str(tmp_path / "videos"))
    assert res["samples"] == 2 and res["skipped"] == {
        "answer before its question": 1, "two questions in one turn": 1, "labels differ (ours </Response>, Streamo </Standby>)": 1,
        "video not found under --video_root": 1, "Standby not followed by a Response": 1,
        "not a Streamo sample (no messages, no question/response)": 1}
    out = capsys.readouterr().out
    assert "skipped 1: video not found under --video_root, e.g. #5 v_b.mp4" in out and "#1 ?" in out
    got = {s["id"]: s for s in load_annotations(str(dst), check_videos=False)}
    assert got["v_a_2_q0"]["query_time"] == 0.0 and got["v_a_2_q0"]["answers"] == [{"start": 2.0, "end": 10.0, "text": "a"}]
    assert got["v_a_0_q0"]["video"] == str(tmp_path / "videos" / "clips" / "v_a.mp4")
    run_py("formats.py", "--from_streamo", str(src), "--out", str(tmp_path / "cli.jsonl"))
    assert sum(1 for _ in open(tmp_path / "cli.jsonl")) == 3  # without --video_root nothing is skipped for its video


def test_iter_json_reads_large_lists_in_pieces(tmp_path):
    items = [{"i": i, "text": "x" * (i % 13), "nested": [{"a": "]"}, "[,"]} for i in range(50)]
    (tmp_path / "list.json").write_text(json.dumps(items, indent=2))
    assert list(formats.iter_json(str(tmp_path / "list.json"), chunk=7)) == items
    write_jsonl(tmp_path / "lines.jsonl", items)
    assert list(formats.iter_json(str(tmp_path / "lines.jsonl"), chunk=5)) == items
    (tmp_path / "bad.json").write_text(json.dumps(items)[:-40] + "}]")
    with pytest.raises(formats.FormatError, match="bad.json: not valid JSON at character"):
        list(formats.iter_json(str(tmp_path / "bad.json"), chunk=16))
    assert formats.streamo_seconds("01:05") == 65 and formats.streamo_seconds(5.9) == 5 and formats.streamo_seconds("") is None


SB_ITEMS = [  # StreamingBench's questions_proactive.json schema; time stamps are absolute in the video file
    {"time": "[0:02:54 - 0:03:24]", "video_path": "./videos/sample_17_proactive.mp4", "video_categories": "basketball",
     "questions": [{"task_type": "Proactive Output", "question": 'When the scoreboard shows 20, output "20".',
                    "time_stamp": "00:02:50", "ground_truth_time_stamp": "00:02:58", "ground_truth_output": "20",
                    "required_ability": "working memory"}]},
    {"time": "[0:00:00 - 0:00:10]", "video_path": "./videos/sample_32_proactive.mp4", "video_categories": "cards",
     "questions": [{"task_type": "Proactive Output", "question": 'When all cards are collected, output "Cards collected".',
                    "time_stamp": "00:00:06", "ground_truth_time_stamp": "00:00:16", "ground_truth_output": "Cards collected",
                    "required_ability": "working memory"},
                   {"task_type": "Proactive Output", "question": 'When the four of hearts shows, output "four of hearts".',
                    "time_stamp": "0:00:02", "ground_truth_time_stamp": "0:00:05", "ground_truth_output": "four of hearts",
                    "required_ability": "working memory"}]},
]


def test_streamingbench_converter(tmp_path):
    src, dst = tmp_path / "questions_proactive.json", tmp_path / "sb" / "proactive.jsonl"
    src.write_text(json.dumps(SB_ITEMS))
    assert formats.main(["--from_streamingbench", str(src), "--out", str(dst)]) == 3
    a, b, c = load_annotations(str(dst), check_videos=False)
    assert (a["id"], a["task"], a["query_time"], a["duration"], a["clip"]) == ("sbpo000_q0", "PO", 170.0, 182.0, [174.0, 204.0])
    assert a["answers"] == [{"time": 178.0, "text": "20", "slots": {"output": "20"}}] and a["video"] == "videos/sample_17_proactive.mp4"
    assert (b["id"], c["id"], c["query_time"], c["answers"][0]["time"]) == ("sbpo001_q0", "sbpo001_q1", 2.0, 5.0)
    formats.main(["--from_streamingbench", str(src), "--out", str(dst), "--video_root", str(tmp_path / "sb_videos")])
    assert load_annotations(str(dst), check_videos=False)[0]["video"] == str(tmp_path / "sb_videos" / "videos" / "sample_17_proactive.mp4")
    res = bench.main(["--ann", str(dst), "--baseline", "oracle", "--rule", "streamingbench", "--out", str(tmp_path / "o.preds.jsonl")])
    assert res["summary"]["w_avg"] == 1.0 and res["streamingbench"] == {"n": 3, "time_accuracy": 1.0, "answer_accuracy": 1.0}
    src.write_text(json.dumps([dict(SB_ITEMS[0], time="0:02:54 to 0:03:24")]))
    with pytest.raises(formats.FormatError, match="StreamingBench entry 0"):
        formats.from_streamingbench(str(src), str(dst))


@pytest.mark.parametrize("dt, s_time, on_time", [(-4, 0.0, False), (-3, 0.25, False), (-2, 0.5, True), (0, 1.0, True),
                                                 (2, 0.5, True), (3, 0.25, False), (4, 0.0, False)])
def test_streamingbench_both_scorings_at_the_window_edges(dt, s_time, on_time):
    """A reply dt seconds from the ground truth: StreamPro-F1 (default window [t-3, t+3], tau 4) and
    StreamingBench's rule (on time within +-2 s; correct = on time and the output is a substring)."""
    s = formats.streamingbench_to_annotations(SB_ITEMS)[0]  # asked at 170, due at 178
    judge = OfflineJudge.from_samples([s])
    for text, acc in (("The score is 20 now.", 1.0), ("twenty", 0.0)):
        row = score_sample(s, [{"time": 178.0 + dt, "text": text}], judge)
        assert row["f1"] == pytest.approx(s_time * acc) and row["time"] == pytest.approx(s_time)
        assert formats.streamingbench_rule(s, [{"time": 178.0 + dt, "text": text}]) == {
            "on_time": on_time, "correct": on_time and acc == 1.0}


def test_streamingbench_rule_takes_the_first_reply_and_exact_case():
    s = formats.streamingbench_to_annotations(SB_ITEMS)[1]  # "Cards collected", asked at 6, due at 16
    rule = lambda rs: formats.streamingbench_rule(s, rs)
    assert rule([]) == {"on_time": False, "correct": False}
    assert rule([{"time": 5.0, "text": "Cards collected"}, {"time": 16.0, "text": "Cards collected!"}]) == {"on_time": True, "correct": True}
    assert rule([{"time": 15.0, "text": "almost"}, {"time": 16.0, "text": "Cards collected"}]) == {"on_time": True, "correct": False}
    assert rule([{"time": 16.0, "text": "cards collected"}]) == {"on_time": True, "correct": False}  # case-sensitive, as count.py
    assert rule([{"time": 10.0, "text": "Cards collected"}]) == {"on_time": False, "correct": False}  # the first reply is early
    assert formats.streamingbench_scores([s], {s["id"]: [{"time": 18.0, "text": "Cards collected"}]}) == \
        {"n": 1, "time_accuracy": 1.0, "answer_accuracy": 1.0}


# -----------------------------------------------------------------------------
# Streaming inference (infer.py): the cache equals a full forward, windows, resumable predictions

import infer  # noqa: E402


def full_logits(model, fmt, ids, recs):
    """A single forward over the whole sequence, no cache: the reference for the incremental path."""
    t = torch.tensor(ids)[None]
    kw = {"pixel_values": torch.cat([r["pv"] for r in recs]), "image_grid_thw": torch.cat([r["grid"] for r in recs])} if recs else {}
    with torch.no_grad():
        return model(input_ids=t, attention_mask=torch.ones_like(t), mm_token_type_ids=(t == fmt.image_token_id).long(), **kw).logits[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_turns_equal_full_forward_batched_and_after_rebuild(tiny, family):
    model, processor = M.load(tiny[family])
    model.eval()
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    frames = np.random.default_rng(0).integers(0, 255, (14, fmt.frames_per_turn, 56, 56, 3), dtype=np.uint8)
    S = infer.Streams(model, fmt, data.SYSTEM_PROMPT, 2, window=4, chunk=3, record=True)  # rebuilds after 7 turns
    got, vit = [[], []], []
    hook = model.model.visual.register_forward_hook(lambda m, args, out: vit.append(len(out.pooler_output)))
    for k in range(10):
        q = "Tell me when the square turns red."
        lg = S.observe([(frames[k], data.time_marker(k), q if k == 1 else None), (frames[13 - k], data.time_marker(k), q if k == 0 else None)])
        for b in range(2):
            got[b].append((len(S.segments[b]), lg[b]))
        # row 1 answers on odd turns (its chunks get longer than row 0's: padding inside the batch)
        text = fmt.ids(" The square turned red.")
        S.end_turn(0, [fmt.decision_ids[data.SILENCE], fmt.eos_id], 0)
        if k % 2:
            S.feed([None, fmt.decision_ids[data.RESPONSE]])
            for t in text:
                S.feed([None, t])
            S.end_turn(1, [fmt.decision_ids[data.RESPONSE], *text, fmt.eos_id], len(text) + 1)
        else:
            S.end_turn(1, [fmt.decision_ids[data.SILENCE], fmt.eos_id], 0)
    hook.remove()
    assert S.rebuilds == 1 and len(S.segments[0]) == 2
    # the ViT ran once a turn, on both rows' frames: the rebuild re-encoded the kept frames from their features. A turn
    # out of the window gave its features back and kept its pixels (training's)
    assert vit == [2 * int(S.ctx[0][0]["grid"][0].prod()) // 4] * 10
    dropped = [r for seg in S.segments[0] for r in seg["turns"] if not any(r is x for x in S.ctx[0])]
    assert len(dropped) == 3 and all(r["vis"] is None and r["pv"] is not None for r in dropped)
    assert all(r["vis"] is not None for r in S.ctx[0])
    for b in range(2):
        # every turn's logits equal one fresh forward over its segment: the rebuilt windowed context plus what followed
        ends, turn = [], 0
        for seg in S.segments[b]:
            ids, recs = list(seg["prefix"]), [{"pv": p, "grid": g} for p, g in seg["images"]]
            for r in seg["turns"]:
                ids += r["user"]
                ends.append((turn, len(ids) - 1, list(ids), recs + [r]))
                ids += r["content"] + r["tail"]
                recs = recs + [r]
                turn += 1
        for turn, e, ids, recs in ends:
            assert torch.allclose(full_logits(model, fmt, ids, recs)[e], got[b][turn][1], atol=1e-4), (b, turn)
    # the rebuild (before turn 8) kept the question turn and the last 4 turns: 5 frames, then 2 more turns
    n_img = int(S.ctx[0][0]["grid"][0].prod()) // 4
    assert S.segments[0][1]["prefix"].count(fmt.image_token_id) == 5 * n_img and len(S.ctx[0]) == 7
    assert S.ctx[0][0]["question"] and S.ctx[1][0]["question"]


def test_a_rebuild_before_the_question_keeps_the_last_turns_once(tiny):
    """A window rebuild before the question is asked keeps the last W turns, each once (no question turn to pin: it
    used to put the newest turn in front of them again), and the next turn's logits equal a fresh forward over them."""
    model, processor = M.load(tiny["qwen2_5_vl"])
    model.eval()
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    frames = np.random.default_rng(0).integers(0, 255, (6, fmt.frames_per_turn, 56, 56, 3), dtype=np.uint8)
    S = infer.Streams(model, fmt, data.SYSTEM_PROMPT, 1, window=2, chunk=1, record=True)  # rebuilt before turn 4, question at 5
    got = []
    for k in range(6):
        got.append(S.observe([(frames[k], data.time_marker(k), "Tell me when it moves." if k == 5 else None)])[0])
        S.end_turn(0, [fmt.decision_ids[data.SILENCE], fmt.eos_id], 0)
    seg = S.segments[0][1]
    assert S.rebuilds == 1 and [r["k"] for r in S.ctx[0]] == [2, 3, 4, 5] and len(seg["images"]) == 2
    r = seg["turns"][0]
    recs = [{"pv": p, "grid": g} for p, g in seg["images"]] + [r]
    ids = seg["prefix"] + r["user"]
    assert torch.allclose(full_logits(model, fmt, ids, recs)[-1], got[4], atol=1e-4)


def test_streams_free_the_turns_their_window_drops(tiny):
    """A turn that leaves the window gives its features back; without a record (Streams' default, what inference runs)
    it is freed whole, pixels too, so a stream's memory stays bounded however long it runs. GRPO's record
    (record=True) keeps every turn's pixels, which its training forward reads."""
    import gc
    import weakref
    model, processor = M.load(tiny["qwen2_5_vl"])
    model.eval()
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    frames = np.random.default_rng(0).integers(0, 255, (8, fmt.frames_per_turn, 56, 56, 3), dtype=np.uint8)
    for record in (False, True):
        S, refs = infer.Streams(model, fmt, data.SYSTEM_PROMPT, 1, window=2, chunk=1, record=record), []
        for k in range(8):
            S.observe([(frames[k], data.time_marker(k), "Tell me when it moves." if k == 0 else None)])
            refs.append((weakref.ref(S.cur[0]["pv"]), weakref.ref(S.cur[0]["vis"].embeds)))
            S.end_turn(0, [fmt.decision_ids[data.SILENCE], fmt.eos_id], 0)
        gc.collect()
        kept = [any(r["k"] == k for r in S.ctx[0]) for k in range(8)]
        assert S.rebuilds == 2 and kept == [True, False, False, False, True, True, True, True]
        assert [f() is not None for _, f in refs] == kept
        assert [p() is not None for p, _ in refs] == ([True] * 8 if record else kept)


@pytest.mark.parametrize("family, backend", [("qwen2_5_vl", "inductor"), ("qwen3_vl", "aot_eager")])
def test_compiled_turns_equal_eager_and_compile_once(tiny, family, backend):
    """infer.py --compile (compiled.StaticTurn): 60 turns of 2 streams with window 6 and chunk 4 (10 rebuilds), one
    row answering every 5th turn (decoded steps), a turn with one row missing (a blank row), each row's question
    turn (eager): every logit row's log-probabilities equal the eager Streams' (fp32, 1e-5). The two graphs (a turn,
    a decoded step) are compiled at turn 2 (turns 0 and 1 hold the system prompt and a question: eager); then
    nothing again, across the rebuilds (dynamo's counters).
    Qwen2.5-VL is compiled by inductor, as --compile runs (its C++ build: about 30 s on 2 cores); Qwen3-VL, whose
    difference is its deepstack (compiled._deepstack), by aot_eager: dynamo's capture, guards and functionalised
    cache writes as inductor gets them, without a second C++ build in CI."""
    import compiled
    from torch._dynamo.utils import counters
    model, processor = M.load(tiny[family])
    model.eval()
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    frames = np.random.default_rng(0).integers(0, 255, (60, fmt.frames_per_turn, 56, 56, 3), dtype=np.uint8)
    q, text, sil = "Tell me when the square turns red.", fmt.ids(" The square turned red."), fmt.decision_ids[data.SILENCE]

    def stream(turn):
        S = infer.Streams(model, fmt, data.SYSTEM_PROMPT, 2, window=6, chunk=4, turn=turn)
        logp, graphs = [], []
        for k in range(60):
            rows = [0] if k == 8 else [0, 1]
            lg = S.observe([(frames[k], data.time_marker(k), q if k == 1 else None),
                            (frames[59 - k], data.time_marker(k), q if k == 3 else None) if k != 8 else None])
            logp.append(torch.log_softmax(lg[rows], -1))
            S.end_turn(0, [sil, fmt.eos_id], 0)
            if k % 5 == 2:
                for t in [fmt.decision_ids[data.RESPONSE], *text]:
                    logp.append(torch.log_softmax(S.feed([None, t])[1:], -1))
                S.end_turn(1, [fmt.decision_ids[data.RESPONSE], *text, fmt.eos_id], len(text) + 1)
            elif k != 8:
                S.end_turn(1, [sil, fmt.eos_id], 0)
            graphs.append(counters["stats"]["unique_graphs"])
        return logp, graphs, S

    eager, _, E = stream(None)
    before = counters["stats"]["unique_graphs"]
    got, graphs, C = stream(compiled.StaticTurn(model, 2, backend=backend))
    assert E.rebuilds == C.rebuilds == 10
    assert max((a - b).abs().max().item() for a, b in zip(eager, got)) <= 1e-5
    assert graphs[2] - before == 2 and graphs[-1] == graphs[2], graphs


def test_compiled_turn_widens_past_999_s_and_refills_as_eager(tiny):
    """compiled.StaticTurn's turn holds the longest turn up to the marker of 999 s: a stream past it widens the turn once
    (a recompile when compiled), and its window rebuilds (StaticTurn.refill, from the frames' features kept at their turns,
    no ViT) give what eager ones give. Uncompiled (backend None: the same code path, no C++ build)."""
    import compiled
    model, processor = M.load(tiny["qwen2_5_vl"])
    model.eval()
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    frames = np.random.default_rng(0).integers(0, 255, (12, fmt.frames_per_turn, 56, 56, 3), dtype=np.uint8)
    silence = [fmt.decision_ids[data.SILENCE], fmt.eos_id]

    def stream(turn):
        S = infer.Streams(model, fmt, data.SYSTEM_PROMPT, 1, window=4, chunk=2, turn=turn)
        logp = []
        for k in range(12):
            lg = S.observe([(frames[k], data.time_marker(993 + k), "Tell me when the square turns red." if k == 2 else None)])
            logp.append(torch.log_softmax(lg, -1))
            S.end_turn(0, silence, 0)
        return logp, S

    eager, E = stream(None)
    turn, vit = compiled.StaticTurn(model, 1, backend=None), []
    hook = model.model.visual.register_forward_hook(lambda m, args, out: vit.append(len(out.pooler_output)))
    got, C = stream(turn)
    hook.remove()
    assert C.rebuilds == E.rebuilds == 2 and turn.T == turn.widest
    assert len(vit) == 12  # the ViT once a turn: a refill re-encodes the frames from the features kept at their turns
    assert max((a - b).abs().max().item() for a, b in zip(eager, got)) <= 1e-5


def test_compiled_turn_grows_its_cache_for_long_answers_as_eager(tiny, capsys):
    """compiled.StaticTurn sizes its static cache from the window, with room for answers of ~4 turns; longer ones grow
    it x2 (its contents kept: Slots.put), and every logit stays eager's, across the rebuilds after it. Uncompiled
    (backend None: the same code path)."""
    import compiled
    model, processor = M.load(tiny["qwen2_5_vl"])
    model.eval()
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    frames = np.random.default_rng(0).integers(0, 255, (6, fmt.frames_per_turn, 56, 56, 3), dtype=np.uint8)
    text, rsp = fmt.ids(" The square turned red." * 20), fmt.decision_ids[data.RESPONSE]

    def stream(turn):
        S = infer.Streams(model, fmt, data.SYSTEM_PROMPT, 1, window=2, chunk=1, turn=turn)
        logp = []
        for k in range(6):
            logp.append(torch.log_softmax(S.observe([(frames[k], data.time_marker(k), "Q?" if k == 0 else None)]), -1))
            for t in [rsp, *text]:
                logp.append(torch.log_softmax(S.feed([t]), -1))
            S.end_turn(0, [rsp, *text, fmt.eos_id], len(text) + 1)
        return logp, S

    eager, E = stream(None)
    turn = compiled.StaticTurn(model, 1, backend=None)
    got, C = stream(turn)
    assert "the static cache grows from 512 to 1024" in capsys.readouterr().err and C.rebuilds == E.rebuilds == 1
    assert max((a - b).abs().max().item() for a, b in zip(eager, got)) <= 1e-5


def test_compiled_turns_of_two_architectures_in_one_process_each_get_their_graphs(tiny):
    """Every StaticTurn compiles the same function, with most guards on the model's modules left out (compiled._guards):
    a Qwen3-VL streamed after a Qwen2.5-VL in one process, same backend and shapes, must get its own graphs, not run
    the first model's (which gave logits off by 0.5, or a KeyError, and failed a CUDA graph's replay on an H200).
    Both orders; dynamo's own backend "eager" (its capture and guards, no compiler)."""
    import compiled
    from torch._dynamo.utils import counters

    def logps(family, turn):
        model, processor = M.load(tiny[family])
        model.eval()
        fmt = data.ChatFormat(processor, M.frames_per_turn(model))
        frames = np.random.default_rng(0).integers(0, 255, (6, fmt.frames_per_turn, 56, 56, 3), dtype=np.uint8)
        S = infer.Streams(model, fmt, data.SYSTEM_PROMPT, 1, window=4, chunk=2, turn=compiled.StaticTurn(model, 1, "eager") if turn else None)
        out, text = [], [fmt.decision_ids[data.RESPONSE], *fmt.ids(" Red.")]
        for k in range(6):
            out.append(torch.log_softmax(S.observe([(frames[k], data.time_marker(k), "Tell me." if k == 1 else None)]), -1))
            if k == 3:  # decoded steps: one token a row, the same shapes in both families
                out += [torch.log_softmax(S.feed([t]), -1) for t in text]
            S.end_turn(0, text + [fmt.eos_id] if k == 3 else [fmt.decision_ids[data.SILENCE], fmt.eos_id], len(text) if k == 3 else 0)
        return out

    for order in (FAMILIES, FAMILIES[::-1]):
        torch._dynamo.reset()
        for family in order:
            before = counters["stats"]["unique_graphs"]
            got, want = logps(family, True), logps(family, False)
            assert counters["stats"]["unique_graphs"] > before, (order, family)  # compiled anew for this model
            assert max((a - b).abs().max().item() for a, b in zip(got, want)) <= 1e-5, (order, family)


def test_streams_window_keeps_question_turn():
    assert data.window_turns(8, 1, 4) == [1, 4, 5, 6, 7]


@pytest.fixture(scope="session")
def trained(tiny, synth, tmp_path_factory):
    """A tiny model briefly trained with CB-Stream on the synthetic fixture (responds sometimes)."""
    out = tmp_path_factory.mktemp("trained") / "sft"
    args = sft.get_args(["--model", tiny["qwen2_5_vl"], "--data", str(synth / "train.jsonl"), "--val", "", "--levels", "0,1",
                         "--out", str(out), "--max_steps", "40", "--batch", "4", "--lr", "3e-3", "--log_every", "100",
                         "--eval_every", "0", "--save_every", "100"])
    sft.main(args)
    return str(out)


def test_incremental_decoding_equals_reencoding_every_turn(trained, synth):
    model, processor = M.load(trained)
    model.eval()
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    s = next(x for x in data.load_annotations(str(synth / "test.jsonl")) if x["level"] == 0)
    frames, _ = fmt.video(s["video_path"])
    args = infer.get_args(["--model", trained, "--threshold", "0.02"])  # a low threshold: some responses to compare
    out, S = infer.run_streams(model, fmt, [(s, frames)], args)
    # naive: every turn re-runs the whole conversation so far, every decoded token too
    pol = infer.Greedy(fmt, 2, 0.02, args.max_new, M.vocab_mask(model, fmt.tok))
    ids, recs, responses = list(fmt.system_ids(data.SYSTEM_PROMPT)), [], []
    q = data.question_turn(s["query_time"])
    for k in range(len(frames)):
        pv, grid, n = fmt.images(frames[k][None])
        recs.append({"pv": pv, "grid": grid})
        ids += fmt.user_ids(data.time_marker(k), n[0], s["question"] if k == q else None)
        t = pol.sil if k < q else pol.first(full_logits(model, fmt, ids, recs)[-1:])[0][0]
        content = [t]
        while content[0] == fmt.decision_ids[data.RESPONSE] and t != fmt.eos_id:
            t = fmt.eos_id if len(content) >= args.max_new else pol.next(full_logits(model, fmt, ids + content, recs)[-1:])[0][0]
            content.append(t)
        if content[0] != fmt.decision_ids[data.RESPONSE]:
            content.append(fmt.eos_id)
        dec, text = infer.response_text(fmt, content)
        if dec == data.RESPONSE:
            responses.append({"time": float(k + 1), "text": text})
        ids += content + list(fmt.asst_close_tail)
    assert responses == out[0]["responses"] and len(responses) > 0


def test_speed_prints_its_table(tiny, capsys):
    """infer.py --speed end to end on a short stream (window 8, rebuilt every 5 turns; 190 turns, the least its turn 180
    needs at chunk 4): its rows and their columns. Timings are not held: a benchmark, not a timed test."""
    infer.main(infer.get_args(["--speed", "--model", tiny["qwen2_5_vl"], "--speed_turns", "190", "--window", "8",
                               "--chunk", "4", "--speed_side", "56"]))
    out = capsys.readouterr().out
    assert "(cpu, float32); 190 turns of one stream, 56-px frames; window 8, rebuild chunk 4" in out
    rows = {line[:22].strip(): line[22:].split() for line in out.splitlines() if line[:22].strip() in
            ("cache + window", "cache, no window", "re-encode (naive)")}
    assert len(rows) == 3 and all(float(v[0]) > 0 and float(v[1]) > 0 for v in rows.values()), out
    assert "36 window rebuilds" in out and "x faster than re-encoding" in out


def test_compiled_streams_say_what_eager_ones_say(trained, synth):
    """run_streams with --compile (here by aot_eager: see test_compiled_turns_equal_eager_and_compile_once), four
    streams of unequal lengths in one batch (rows that end take part as blank rows), with answers decoded: the
    same responses, decisions and p(</Response>) (1e-5) as without."""
    model, processor = M.load(trained)
    model.eval()
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    samples = sorted(data.load_annotations(str(synth / "test.jsonl")), key=lambda x: x["duration"])[::5][:4]
    batch = [(s, fmt.video(s["video_path"])[0]) for s in samples]
    assert len({len(f) for _, f in batch}) > 1
    argv = ["--model", trained, "--threshold", "0.02", "--max_new", "8"]
    eager, _ = infer.run_streams(model, fmt, batch, infer.get_args(argv))
    got, S = infer.run_streams(model, fmt, batch, infer.get_args(argv + ["--compile", "aot_eager"]))
    assert sum(len(o["responses"]) for o in eager) > 0
    for a, b in zip(eager, got):
        assert a["responses"] == b["responses"] and a["decisions"] == b["decisions"]
        assert np.allclose(a["p_response"], b["p_response"], atol=1e-5)


def test_offline_model_wait_protocol(tiny, synth):
    """An instruction model without decision tokens: the Wait decision tree (SPEC 3); any reply other
    than Wait is a response, turns before the question are a forced Wait."""
    model, processor = M.load(tiny["qwen2_5_vl"])
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    s = next(x for x in data.load_annotations(str(synth / "test.jsonl")) if x["query_time"] > 0)
    frames, _ = fmt.video(s["video_path"])
    out, S = infer.run_streams(model, fmt, [(s, frames)], infer.get_args(["--offline_model", tiny["qwen2_5_vl"], "--max_new", "4"]),
                               record=True)
    q = data.question_turn(s["query_time"])
    assert "reply Wait" in fmt.tok.decode(S.system) and len(out[0]["p_response"]) == len(out[0]["decisions"]) == len(frames)
    turns = [r for seg in S.segments[0] for r in seg["turns"]]
    assert all(r["content"] == fmt.ids("Wait") + [fmt.eos_id] for r in turns[:q])
    texts = [fmt.tok.decode(r["content"], skip_special_tokens=True).strip() for r in turns]
    said = [{"time": float(k + 1), "text": x} for k, x in enumerate(texts) if k >= q and x.strip(" .!").lower() not in ("wait", "")]
    assert out[0]["responses"] == said
    assert [d == data.RESPONSE for d in out[0]["decisions"]] == [any(r["time"] == k + 1 for r in said) for k in range(len(frames))]


def test_predict_file_resumes_and_survives_a_bad_video(trained, synth, tmp_path):
    rows, ann = with_broken_video(synth, "test", 4, 2, tmp_path)
    out = tmp_path / "preds.jsonl"
    args = infer.get_args(["--model", trained, "--ann", ann, "--out", str(out), "--streams", "2"])
    # the others stream; the run then fails, saying how many of how many, why, and where the errors are
    why = rf"1 of 4 samples failed to stream \(cannot read video: 1, e.g. {rows[2]['id']} \S*broken.mp4\); their errors are in \S*preds.errors.jsonl"
    with pytest.raises(data.UserError, match=why + ".*--allow_failed"):
        infer.predict_file(args)
    got = [json.loads(l) for l in open(out)]
    assert sorted(g["id"] for g in got) == sorted(rows[i]["id"] for i in (0, 1, 3))
    err = [json.loads(l) for l in open(tmp_path / "preds.errors.jsonl")]
    assert len(err) == 1 and err[0]["id"] == rows[2]["id"] and "broken.mp4" in err[0]["error"]
    assert all(len(g["p_response"]) == int(r["duration"]) for g in got for r in rows if r["id"] == g["id"])
    # resume: a cut-off last line and a failed sample are redone, finished ones are kept as they were; the
    # failure, expected now (--allow_failed), is a warning and the errors file holds it once
    lines = open(out).read().splitlines()
    open(out, "w").write("\n".join(lines[:1]) + "\n" + lines[1][: len(lines[1]) // 2])
    args.allow_failed = True
    infer.predict_file(args)
    again = {json.loads(l)["id"]: json.loads(l) for l in open(out) if l.strip().endswith("}")}
    assert set(again) == {g["id"] for g in got} and again[got[0]["id"]] == got[0]
    assert [json.loads(l)["id"] for l in open(tmp_path / "preds.errors.jsonl")] == [rows[2]["id"]]
    # the video mended: a rerun streams that sample alone and leaves no errors file
    shutil.copy(synth / json.loads(open(synth / "test.jsonl").readlines()[2])["video"], tmp_path / "broken.mp4")
    args.allow_failed = False
    infer.predict_file(args)
    assert set(infer.read_done(str(out))) == {r["id"] for r in rows} and not (tmp_path / "preds.errors.jsonl").exists()


# -----------------------------------------------------------------------------
# SFT runs (sft.py): the imbalance effect, the offline stage, 1 vs 2 processes, resume



def sft_args(tiny, synth, out, *extra):
    return sft.get_args(["--model", tiny["qwen2_5_vl"], "--data", str(synth / "train.jsonl"), "--val", "", "--levels", "0,1",
                         "--out", str(out), "--batch", "4", "--micro_batch", "2", "--lr", "3e-3", "--log_every", "100",
                         "--eval_every", "0", "--save_every", "1000", *extra])


def losses_of(out):
    return [json.loads(l)["loss"] for l in open(os.path.join(out, "log.jsonl"))]


@torch.no_grad()
def response_rate(path, synth):
    """Teacher-forced: how often argmax at a decision position is </Response>, on training conversations."""
    model, processor = M.load(path)
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    args = sft.get_args(["--levels", "0,1"])
    train = sft.StreamData(str(synth / "train.jsonl"), fmt, args)
    b = data.collate([train.encode(i) for i in range(len(train.samples))], processor.tokenizer.pad_token_id)
    logits = model(**data.model_inputs(b)).logits[:, :-1]
    cls = b["classes"][:, 1:]
    dec = (cls == data.C_SILENCE) | (cls == data.C_RESPONSE)
    return float((logits[dec].argmax(-1) == fmt.decision_ids[data.RESPONSE]).float().mean()), float((cls[dec] == data.C_RESPONSE).float().mean())


@pytest.mark.slow
def test_cb_stream_responds_where_ce_collapses_to_silence(tiny, synth, tmp_path):
    rates = {}
    for loss in ("ce", "cb"):
        sft.main(sft_args(tiny, synth, tmp_path / loss, "--loss", loss, "--max_steps", "60"))
        rates[loss] = response_rate(str(tmp_path / loss), synth)
    true_rate = rates["ce"][1]
    assert 0 < true_rate < 0.15  # most turns are silent
    assert rates["ce"][0] < true_rate / 2 and rates["cb"][0] > rates["ce"][0] + 0.05, rates


@pytest.mark.slow
def test_offline_stage_learns_to_see(tiny, tmp_path):
    out = tmp_path / "base"
    sft.main(sft.get_args(["--stage", "offline", "--model", tiny["qwen2_5_vl"], "--out", str(out), "--max_steps", "500",
                           "--eval_every", "0", "--log_every", "1000"]))
    model, processor = M.load(str(out))
    acc = sft.eval_offline(model, data.ChatFormat(processor, M.frames_per_turn(model)), 64, seed=12345, device="cpu")
    assert acc["colour_acc"] > 0.5, acc  # chance: a quarter for one shape, a sixteenth for two


def test_narrate_stage_streams_are_captioned_by_what_changed(tiny, tmp_path):
    # a caption names a change exactly when the turn's two frames differ (the change happens inside the turn)
    for x in synthetic.narration(10, seed=3):
        f = x["frames"]  # [turns, 2 frames (k - 0.5 s, k s), H, W, 3]
        assert [not np.array_equal(f[k, 1], f[k, 0]) for k in range(len(f))] == [c != "Nothing changed." for c in x["captions"]]
    # the narrate stage trains from a base and reports the stream accuracies, both split by change / no change
    out = tmp_path / "narrator"
    sft.main(sft.get_args(["--stage", "narrate", "--model", tiny["qwen2_5_vl"], "--out", str(out), "--max_steps", "2",
                           "--batch", "4", "--micro_batch", "4", "--eval_every", "0", "--log_every", "1"]))
    assert [json.loads(l)["step"] for l in open(out / "log.jsonl")] == [1, 2]
    model, processor = M.load(str(out))
    acc = sft.eval_offline(model, data.ChatFormat(processor, M.frames_per_turn(model)), 8, seed=12345, device="cpu")
    assert all(0 <= acc[k] <= 1 for k in ("stream_change_acc", "stream_still_acc")), acc


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tiny, synth, tmp_path):
    common = ["sft.py", "--model", tiny["qwen2_5_vl"], "--data", str(synth / "train.jsonl"), "--val", "", "--levels", "0,1",
              "--batch", "4", "--max_steps", "3", "--lr", "3e-3", "--log_every", "1", "--eval_every", "0"]
    common += ["--val", str(synth / "val.jsonl"), "--eval_samples", "3"]  # eval at the last step, 2 + 1 samples per rank
    run_py(*common, "--micro_batch", "4", "--out", str(tmp_path / "one"))
    run_py("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common, "--micro_batch", "1", "--out", str(tmp_path / "two"),
           env={"OMP_NUM_THREADS": "1"})
    run_py("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common, "--micro_batch", "1", "--fsdp", "--grad_ckpt",
           "--out", str(tmp_path / "fsdp"), env={"OMP_NUM_THREADS": "1"})  # FSDP2 on CPU/gloo in fp32 (bf16/NCCL: GPUs only)
    one, two, fsdp = (losses_of(tmp_path / d) for d in ("one", "two", "fsdp"))
    val_ce = [json.loads(open(tmp_path / d / "log.jsonl").readlines()[-1])["val_ce"] for d in ("one", "two", "fsdp")]
    assert np.allclose(val_ce, val_ce[0], rtol=1e-4), val_ce  # the eval's sums are all-reduced over uneven shares
    last = json.loads(open(tmp_path / "one" / "log.jsonl").readlines()[-1])
    assert all(k in last for k in ("auc", "tf_auc")), last  # free-running and teacher-forced ROC-AUC
    # same global batch, same class counts, same normaliser: equal up to float summation order (documented 1e-5)
    assert len(one) == len(two) == len(fsdp) == 3, (one, two, fsdp)
    assert np.allclose(one, two, rtol=1e-5, atol=1e-6) and np.allclose(one, fsdp, rtol=1e-5, atol=1e-6), (one, two, fsdp)
    # the FSDP checkpoint is gathered into full tensors and reloads as an ordinary model with the same weights
    a = M.load(str(tmp_path / "one"))[0].state_dict()
    b = M.load(str(tmp_path / "fsdp"))[0].state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # full tensors, not rank 0's shard
    # Adam turns float-noise gradients into updates of up to lr per step, so weights agree to 3 x lr, not 1e-6
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 3 * 3e-3


def test_resume_continues_exactly(tiny, synth, tmp_path):
    sft.main(sft_args(tiny, synth, tmp_path / "a", "--max_steps", "4"))
    sft.main(sft_args(tiny, synth, tmp_path / "b", "--max_steps", "4", "--stop_at", "2"))
    assert len(losses_of(tmp_path / "b")) == 2
    with open(tmp_path / "b" / "log.jsonl", "a") as f:  # a crash after logging step 3, before its checkpoint
        f.write(json.dumps({"step": 3, "loss": -1.0}) + '\n{"step": 4, "lo')
    sft.main(sft_args(tiny, synth, tmp_path / "b", "--max_steps", "4", "--resume"))
    a, b = losses_of(tmp_path / "a"), losses_of(tmp_path / "b")
    assert [json.loads(l)["step"] for l in open(tmp_path / "b" / "log.jsonl")] == [1, 2, 3, 4]  # each step once
    assert len(b) == 4 and np.allclose(a, b, rtol=0, atol=1e-6), (a, b)
    assert not os.path.exists(str(tmp_path / "b") + ".tmp") and M.latest(str(tmp_path / "b")) == str(tmp_path / "b")


def test_bad_sample_is_named_or_skipped(tiny, synth, tmp_path):
    rows, ann = with_broken_video(synth, "train", 6, 1, tmp_path)
    args = sft_args(tiny, synth, tmp_path / "x", "--max_steps", "2")
    args.data = ann
    with pytest.raises(data.UserError, match=rf"sample {rows[1]['id']} .*broken.mp4.*; rerun with --skip_bad"):
        sft.main(args)
    args.skip_bad = True
    sft.main(args)
    assert len(losses_of(tmp_path / "x")) == 2


# -----------------------------------------------------------------------------
# StreamBridge (SPEC 6): the round-decayed memory (memory.py) and the activation model (activation.py)

import activation  # noqa: E402
import memory  # noqa: E402


def test_decay_merges_the_earliest_rounds_first_and_drops_only_past_merging():
    """memory.compress on units of 10 tokens: two turns before the question, the question turn (pinned), a round that
    ends with an answer, an open round. Each merge saves 10 tokens; a merged unit lists the units it holds."""
    def units():
        names = ["a0", "a1", "Q", "b0", "b1", "b2", "B3", "c0", "c1", "c2", "c3"]  # capital: an answer; Q: the question
        return [{"id": [n], "q": n == "Q", "answer": n[0].isupper() and n != "Q"} for n in names]

    def run(budget):
        out = memory.compress(units(), budget, lambda u: 10, lambda a, b: {"id": a["id"] + b["id"], "q": False, "answer": b["answer"]},
                              lambda u: u["answer"], lambda u: u["q"])
        return ["+".join(u["id"]) for u in out]

    assert run(110) == ["a0", "a1", "Q", "b0", "b1", "b2", "B3", "c0", "c1", "c2", "c3"]  # fits: nothing moves
    assert run(90) == ["a0+a1", "Q", "b0+b1", "b2", "B3", "c0", "c1", "c2", "c3"]  # the earliest rounds first, until it fits
    # a whole pass over every round, then the earliest again: older rounds decay more (b: 4 frames in one, c: 2 + 2)
    assert run(50) == ["a0+a1", "Q", "b0+b1+b2+B3", "c0+c1", "c2+c3"]
    # the dialogue alone over budget (every round one turn): the oldest turns are dropped, never the question
    assert run(25) == ["Q", "c0+c1+c2+c3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_decay_turns_equal_full_forward_over_the_compressed_sequence(tiny, family):
    """--memory decay (memory.Decay), 2 streams in one batch, one answering every 10th turn (rounds): before every
    decision each row's context is within max_len; every turn's logits equal one full forward over its segment (the
    compressed prefix, merged frames as features, then the turns after it), positions by the model's own rope index;
    a merged turn's features are the mean of the ViT's features of the frames it covers; the newest turns stay whole,
    and the turns in context always cover every second (merged, not dropped)."""
    model, processor = M.load(tiny[family])
    model.eval()
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    frames = np.random.default_rng(0).integers(0, 255, (40, fmt.frames_per_turn, 56, 56, 3), dtype=np.uint8)
    max_len, q, text = 700, "Tell me when the square turns red.", fmt.ids(" The square turned red.")
    S = infer.Streams(model, fmt, data.SYSTEM_PROMPT, 2, memory=memory.Decay(max_len), record=True)
    got, kept = [[], []], [[], []]  # kept: each compression's turns, per row (its segment's prefix)
    for k in range(40):
        lg = S.observe([(frames[k], data.time_marker(k), q if k == 1 else None), (frames[39 - k], data.time_marker(k), q if k == 0 else None)])
        assert all(int(S.mask[b].sum()) <= max_len for b in range(2)), k
        for b in range(2):
            if len(S.segments[b]) > len(kept[b]) + 1:  # just compressed: the newest turns (a quarter of max_len) are single frames
                kept[b].append(list(S.ctx[b]))
                newest = np.cumsum([len(r["ids"]) for r in reversed(S.ctx[b])])
                assert all(r.get("frames", 1) == 1 for r, n in zip(reversed(S.ctx[b]), newest) if n <= max_len // 4)
        for b in range(2):
            got[b].append(lg[b])
        S.end_turn(0, [fmt.decision_ids[data.SILENCE], fmt.eos_id], 0)
        if k % 10 == 6:
            for t in [fmt.decision_ids[data.RESPONSE], *text]:
                S.feed([None, t])
            S.end_turn(1, [fmt.decision_ids[data.RESPONSE], *text, fmt.eos_id], len(text) + 1)
        else:
            S.end_turn(1, [fmt.decision_ids[data.SILENCE], fmt.eos_id], 0)
    assert S.rebuilds >= 2 and max(r.get("frames", 1) for b in range(2) for r in S.ctx[b]) >= 4

    def full(ids, images):
        t = torch.tensor(ids)[None]
        kw = memory.visual_inputs([x for x, _ in images], "cpu")
        with torch.no_grad():
            return model(input_ids=t, attention_mask=torch.ones_like(t), mm_token_type_ids=(t == fmt.image_token_id).long(),
                         image_grid_thw=torch.cat([g for _, g in images]), **kw).logits[0, -1]

    with torch.no_grad():  # each frame's features, from its pixels
        seen = [[model.model.get_image_features(*fmt.images(frames[k if b == 0 else 39 - k][None])[:2]).pooler_output[0]
                 for k in range(40)] for b in range(2)]
    for b in range(2):
        turn = 0
        assert [s for r in S.ctx[b] for s in range(r.get("first", r["k"]), r["k"] + 1)] == list(range(40))
        for seg, recs in zip(S.segments[b], [[]] + kept[b]):
            ids, images = list(seg["prefix"]), list(seg["images"])
            for r, (x, _) in zip(recs, images, strict=True):  # a (merged) frame: the mean of the frames its turn covers
                assert torch.allclose(x.embeds, torch.stack(seen[b][r.get("first", r["k"]):r["k"] + 1]).mean(0), atol=1e-5)
            for r in seg["turns"]:
                ids += r["user"]
                images.append((r["vis"], r["grid"]))
                assert torch.allclose(full(ids, images), got[b][turn], atol=1e-4), (b, turn)
                ids += r["content"] + r["tail"]
                turn += 1
        assert turn == 40


def test_act_labels_by_hand():
    """The activation model's labels (activation.act_labels): None before the question; the last P of each answer's
    segment (from the turn after the previous answer, the first from the question turn) positive, at least its turn."""
    conv = data.build_conversation(sample([{"time": 6.0, "text": "a"}, {"time": 16.0, "text": "b"}], query_time=2.0, duration=20.0), 20)
    assert [t["k"] for t in conv["turns"] if t["decision"] == data.RESPONSE] == [5, 15]  # segments: turns 2-5, 6-15
    assert activation.act_labels(conv, 0.1) == [None, None, 0, 0, 0, 1] + [0] * 9 + [1, 0, 0, 0, 0]
    assert activation.act_labels(conv, 0.5) == [None, None, 0, 0, 1, 1] + [0] * 5 + [1] * 5 + [0] * 4
    assert activation.act_labels(conv, 1.0) == [None, None] + [1] * 14 + [0] * 4


@pytest.fixture(scope="session")
def act(tiny, synth, tmp_path_factory):
    """A tiny activation model (sft.py --activation), 30 steps, evaluated at its end on its own training data."""
    out = tmp_path_factory.mktemp("act") / "act"
    sft.main(act_args(tiny, synth, out))
    return str(out)


def act_args(tiny, synth, out, *extra):
    return sft.get_args(["--activation", "--model", tiny["qwen2_5_vl"], "--data", str(synth / "train.jsonl"), "--val", str(synth / "train.jsonl"),
                         "--levels", "0,1", "--out", str(out), "--max_steps", "30", "--batch", "4", "--micro_batch", "4", "--lr", "3e-3",
                         "--log_every", "100", "--eval_every", "0", "--eval_samples", "21", "--save_every", "1000", *extra])


def test_activation_model_learns_and_resumes(act, tiny, synth, tmp_path):
    """sft.py --activation: the score head learns the <ACT> labels (ROC-AUC well above chance on the conversations it
    trained on, against the turns that should respond and its own labels); the head and the threshold are saved with the
    checkpoint and read back (activation.load: the LM head replaced by the score head); a run cut at step 15 and resumed
    repeats the uninterrupted run's losses."""
    last = json.loads(open(os.path.join(act, "log.jsonl")).readlines()[-1])
    assert last["auc"] > 0.8 and last["act_auc"] > 0.8, last
    config = json.load(open(os.path.join(act, "config.json")))
    assert config["streampro_act"] and config["streampro_act_threshold"] == last["threshold"]
    model, fmt, threshold = activation.load(act)
    assert model.lm_head is model.act_head and threshold == last["threshold"] and fmt.act == fmt.tok.convert_tokens_to_ids("<ACT>")
    b = tmp_path / "b"
    sft.main(act_args(tiny, synth, b, "--stop_at", "15"))
    sft.main(act_args(tiny, synth, b, "--resume"))
    assert np.allclose(losses_of(act), losses_of(b), rtol=0, atol=1e-6), (losses_of(act), losses_of(b))


def test_gate_answers_only_where_the_activation_model_fires(trained, act, synth):
    """infer.py --activation: the main model answers on exactly the turns from the question on where the activation
    model's probability (written as p_response) reaches --act_threshold, whatever its own decision tokens say; at
    threshold 1 it never answers. The same with --memory decay, compressing."""
    model, processor = M.load(trained)
    model.eval()
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    samples = [s for s in data.load_annotations(str(synth / "test.jsonl")) if s["level"] == 0][:3]
    batch = [(s, fmt.video(s["video_path"])[0]) for s in samples]
    common = ["--model", trained, "--activation", act, "--max_new", "6"]
    probe, _ = infer.run_streams(model, fmt, batch, infer.get_args(common + ["--act_threshold", "1"]))
    assert not any(o["responses"] for o in probe)
    qs = [data.question_turn(s["query_time"]) for s in samples]
    threshold = float(np.median([p for o, q in zip(probe, qs) for p in o["p_response"][q:]]))
    for extra in ([], ["--memory", "decay", "--max_len", "400"]):
        out, S = infer.run_streams(model, fmt, batch, infer.get_args(common + ["--act_threshold", str(threshold)] + extra))
        fired = 0
        for o, q, ref in zip(out, qs, probe):
            assert np.allclose(o["p_response"], ref["p_response"], atol=1e-4) if not extra else True
            want = [float(k + 1) for k, p in enumerate(o["p_response"]) if k >= q and p >= threshold]
            assert [r["time"] for r in o["responses"]] == want and all(r["text"] for r in o["responses"])
            fired += len(want)
        assert 0 < fired < sum(len(f) - q for (_, f), q in zip(batch, qs))
    assert S.rebuilds > 0  # (the decay run compressed)


# -----------------------------------------------------------------------------
# GRPO (grpo.py): advantages, the clipped loss, rollouts that reproduce their log-probs, an update

import grpo  # noqa: E402


def test_advantages_equal_rewards_and_one_outlier():
    assert torch.equal(grpo.advantages([0.3, 0.3, 0.3]), torch.zeros(3))  # no signal from a flat group
    # [0, 0, 0, 1]: mean 0.25, sample std 0.5 -> (R - 0.25) / (0.5 + 1e-4)
    assert torch.allclose(grpo.advantages([0, 0, 0, 1]), torch.tensor([-0.25, -0.25, -0.25, 0.75]) / 0.5001, atol=1e-6)
    assert torch.allclose(grpo.advantages([0, 0, 0, 1], "mean"), torch.tensor([-0.25, -0.25, -0.25, 0.75]))
    assert torch.equal(grpo.advantages([2.0]), torch.zeros(1))


def test_clipped_token_loss_and_k3_by_hand():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.1, 1.5, 0.5, 1.5]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    # rho 1.1, A=1: -1.1 | rho 1.5, A=1: clipped at 1.28 | rho 0.5, A=-1: -min(-0.5, -0.8) = 0.8 | rho 1.5, A=-1: 1.5
    assert torch.allclose(grpo.clipped_token_loss(logp, old, adv), torch.tensor([-1.1, -1.28, 0.8, 1.5]))
    assert torch.allclose(grpo.clipped_token_loss(logp, old, adv, weight=torch.tensor([1.0, 0.5, 1.0, 0.0])), torch.tensor([-1.1, -0.64, 0.8, 0.0]))
    assert torch.allclose(grpo.k3(torch.zeros(2), torch.tensor([0.0, 0.5])), torch.tensor([0.0, math.exp(0.5) - 1.5]))


def rollout_args(*extra):
    return grpo.get_args(["--group", "2", "--max_new", "12", *extra])


def test_rollout_log_probs_are_reproduced_by_a_full_forward(trained, synth):
    model, processor = M.load(trained)
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    s = data.load_annotations(str(synth / "train.jsonl"))[0]
    frames, _ = fmt.video(s["video_path"])
    gen = torch.Generator().manual_seed(0)
    trajs = grpo.rollout(model, fmt, [(s, frames)], rollout_args(), gen, M.vocab_mask(model, fmt.tok))
    assert len(trajs) == 2 and all(len(t["steps"]) == len(frames) - data.question_turn(s["query_time"]) for t in trajs)
    n = 0
    for t in trajs:
        for seq in grpo.sequences(t):
            b = grpo.collate_seqs([{**seq, "adv": 1.0}], fmt.tok.pad_token_id, fmt.image_token_id, "cpu")
            with torch.no_grad():
                logp = grpo.token_logp(model, b, 1.0, M.vocab_mask(model, fmt.tok))
            assert len(logp) == sum(seq["train"]) and torch.allclose(logp, b["old"], atol=1e-4)
            n += len(logp)
            # the trained tokens are exactly the sampled assistant tokens: no frame, user or system token
            assert not (b["target"] == fmt.image_token_id).any()
            assert b["target"].tolist() == [i for i, t in zip(seq["ids"], seq["train"]) if t]
    assert n >= 2 * (len(frames) - data.question_turn(s["query_time"]))  # at least one sampled token per decided turn


def test_one_update_moves_log_probs_by_the_sign_of_the_advantage(trained, synth):
    model, processor = M.load(trained)
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    s = data.load_annotations(str(synth / "train.jsonl"))[0]
    frames, _ = fmt.video(s["video_path"])
    traj = grpo.rollout(model, fmt, [(s, frames)], rollout_args("--group", "1"), torch.Generator().manual_seed(1), M.vocab_mask(model, fmt.tok))[0]
    seq = grpo.sequences(traj)[0]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    moved = {}
    for adv in (1.0, -1.0):
        model.load_state_dict(start)
        b = grpo.collate_seqs([{**seq, "adv": adv}], fmt.tok.pad_token_id, fmt.image_token_id, "cpu")
        logp = grpo.token_logp(model, b, 1.0)
        loss = grpo.clipped_token_loss(logp, logp.detach(), b["adv"]).sum() / len(logp)
        g, = torch.autograd.grad(loss, logp, retain_graph=True)
        assert len(g) == sum(seq["train"]) and (g != 0).all()  # every sampled token is trained, nothing else is
        loss.backward()
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()  # small: first order
        model.zero_grad()
        with torch.no_grad():
            moved[adv] = float((grpo.token_logp(model, b, 1.0) - logp.detach()).sum())
    assert moved[1.0] > 0 > moved[-1.0], moved


def test_grpo_runs_and_resumes(trained, synth, tmp_path):
    common = ["--model", trained, "--data", str(synth / "train.jsonl"), "--val", str(synth / "val.jsonl"), "--levels", "0,1",
              "--batch", "2", "--group", "2", "--max_new", "8", "--eval_samples", "2", "--eval_every", "100", "--micro_batch", "2"]
    grpo.main(grpo.get_args(common + ["--out", str(tmp_path / "a"), "--max_steps", "3"]))
    grpo.main(grpo.get_args(common + ["--out", str(tmp_path / "b"), "--max_steps", "3", "--stop_at", "2"]))
    grpo.main(grpo.get_args(common + ["--out", str(tmp_path / "b"), "--max_steps", "3", "--resume"]))
    logs = lambda d: [json.loads(l) for l in open(d / "log.jsonl") if '"reward"' in l]
    a, b = logs(tmp_path / "a"), logs(tmp_path / "b")
    assert [r["step"] for r in a] == [1, 2, 3] and [r["step"] for r in b] == [1, 2, 3]
    assert np.allclose([r["reward"] for r in a], [r["reward"] for r in b]) and np.allclose([r["loss"] for r in a], [r["loss"] for r in b], atol=1e-6)
    assert all(0 <= r["r_format"] <= 1 and 0 <= r["r_turn"] <= 2 and abs(r["logp_gap"]) < 1e-3 and np.isfinite(r["loss"]) for r in a)
    model, _ = M.load(M.latest(str(tmp_path / "a")))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not any(p.requires_grad for p in model.model.visual.parameters())  # a tiny model's ViT and projector stay frozen


@pytest.mark.slow
def test_grpo_under_torchrun_two_processes(trained, synth, tmp_path):
    # FSDP2 + activation checkpointing, with an evaluation before the first step (uneven shares: 2 + 1).
    # A 6-turn window rebuilt every 3 turns cuts each trajectory into segments, one per micro-batch, so
    # ranks with videos of different lengths run different numbers of micro-batches (the short rank pads)
    run_py("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "grpo.py", "--model", trained,
           "--data", str(synth / "train.jsonl"), "--val", str(synth / "val.jsonl"), "--eval_samples", "3", "--levels", "0,1",
           "--batch", "2", "--group", "2", "--max_new", "8", "--max_steps", "2", "--fsdp", "--grad_ckpt",
           "--window", "6", "--chunk", "3", "--micro_batch", "1", "--out", str(tmp_path / "g"), env={"OMP_NUM_THREADS": "1"})
    recs = [json.loads(l) for l in open(tmp_path / "g" / "log.jsonl")]
    assert [r["step"] for r in recs] == [0, 1, 2] and "val_f1" in recs[0] and "val_sampled_f1" in recs[0]  # greedy and sampled
    # the trainer's log-probabilities reproduce the sampler's: rollouts ran on the cache (eval mode), not
    # through checkpointed layers that drop it (that bug gave a gap of 3.8 nats)
    assert all(abs(r["logp_gap"]) < 1e-3 for r in recs[1:]), recs


def test_window_schedule_is_the_one_infer_streams_follows():
    """data.window_start, the schedule the vLLM backend prompts from, is what infer.Streams rebuilds on:
    the turns before k grow from W to W + chunk (the question turn aside), then the last W are kept."""
    for W, chunk in ((1, 1), (3, 2), (6, 3), (10, 5)):
        start = 0
        for k in range(120):
            if k - start > W + chunk:
                start = k - W
            assert data.window_start(k, W, chunk) == start
    assert [data.window_start(k, 0, 3) for k in (0, 50)] == [0, 0]  # no window


def test_vllm_prompts_follow_the_window_and_fit_max_model_len(tiny):
    """vllm_engine.Row: the prompt of turn k holds the system prompt, the question turn and the window's
    turns (one <|image_pad|> per frame, which vLLM expands), and max_model_len bounds the longest one
    with its frames expanded and a full-length answer. Runs without vLLM."""
    import vllm_engine as V
    _, processor = M.load(tiny["qwen2_5_vl"])
    fmt = data.ChatFormat(processor, 1)
    W, chunk, q, n, max_new = 4, 2, 1, 20, 6
    row = V.Row(fmt, fmt.system_ids(data.SYSTEM_PROMPT), q)
    frame = np.zeros((56, 56, 3), np.uint8)
    n_vis = fmt.images(frame[None])[2][0]
    bound = V.max_model_len(fmt, W, chunk, n, max_new, len(fmt.ids("Where?")), data.SYSTEM_PROMPT)
    for k in range(n):
        row.add(frame, data.time_marker(k), "Where?" if k == q else None)
        p = row.prompt(W, chunk)
        start = data.window_start(k, W, chunk)
        kept = ([q] if q < start else []) + list(range(start, k + 1))
        assert len(p["multi_modal_data"]["image"]) == len(kept) <= V.turns_in_context(W, chunk, n)
        assert p["prompt_token_ids"].count(fmt.image_token_id) == len(kept)
        assert len(p["prompt_token_ids"]) + len(kept) * (n_vis - 1) + max_new + 1 <= bound
        row.turns[k]["content"] = [fmt.decision_ids[data.RESPONSE]] + fmt.ids(" x" * (max_new - 2)) + [fmt.eos_id]
    text = fmt.tok.decode(row.prompt(W, chunk)["prompt_token_ids"])
    assert "Where?" in text and "<15s-16s>" in text and "<14s-15s>" not in text  # turn 19: start 15


def test_bench_model_calibrate_and_table(trained, synth, tmp_path):
    import shutil
    run = tmp_path / "seed0"
    shutil.copytree(trained, run / "sft-ce")
    ann, val = str(synth / "test.jsonl"), str(synth / "val.jsonl")
    res = bench.main(["--model", str(run / "sft-ce"), "--ann", ann])
    assert os.path.isfile(run / "sft-ce" / "preds-test.jsonl") and 0 <= res["summary"]["auc"] <= 1
    assert set(res["summary"]["levels"]) == {0, 1, 2} and res["summary"]["n"] == 21
    tuned = bench.main(["--model", str(run / "sft-ce"), "--ann", ann, "--calibrate", val])
    assert "-t" in tuned["preds"] and os.path.isfile(run / "sft-ce" / "preds-val.jsonl")
    table = bench.main(["--table", str(run), "--ann", ann])
    rows = table.splitlines()
    assert rows[0].startswith("| model | PU") and rows[2].startswith("| CE |") and rows[3].startswith("| CE, threshold tuned on val |")
    assert f"{100 * res['summary']['w_avg']:.1f}" in rows[2]
    # the free-running ROC-AUC on levels 0-1, then the Avg of each seed
    samples = data.load_annotations(ann, check_videos=False)
    l01 = metric.roc_auc(*bench.decision_scores([s for s in samples if s["level"] < 2], res["preds"]))
    assert res["summary"]["auc_levels_01"] == l01 and 0 <= l01 <= 1
    assert all(m["auc"] is None or 0 <= m["auc"] <= 1 for m in res["summary"]["levels"].values())
    assert rows[2].endswith(f"| {l01:.3f} | {100 * res['summary']['avg']:.1f} |")
    # per level-2 task: F1, and the ROC-AUC of its own turns (None where a task has no positive turn)
    eu = [s for s in samples if s["level"] == 2 and s["task"] == "EU"]
    auc_eu = metric.roc_auc(*bench.decision_scores(eu, res["preds"]))
    assert res["summary"]["levels"][2]["task_auc"]["EU"] == (None if np.isnan(auc_eu) else auc_eu)
    f1_head, auc_head = rows.index("| model | EU | OU | AA | TP | TG | GP | RF |"), rows.index(
        "| model | AUC L0–1 | AUC EU | AUC OU | AUC AA | AUC TP | AUC TG | AUC GP | AUC RF |")
    assert rows[f1_head + 2].startswith("| CE |") and rows[auc_head + 2].startswith("| CE |")
    assert rows[auc_head + 2].split(" | ")[2] == ("-" if np.isnan(auc_eu) else f"{auc_eu:.3f}")


def test_best_threshold_by_hand():
    # sorted by p: .9(+) .8(-) .3(+) .2(-); respond to the top k: F1 = 2TP / (k + 2) = 2/3, 1/2, 4/5, 2/3 -> 0.3
    assert bench.best_threshold([0.2, 0.9, 0.3, 0.8], [0, 1, 1, 0]) == 0.3
    assert bench.best_threshold([0.5, 0.5, 0.1], [1, 0, 0]) == 0.5  # ties go together: k = 2 (F1 2/3) beats k = 3 (1/2)


# -----------------------------------------------------------------------------
# What the GPU path needs, checked on a CPU; bad input and what a crash leaves behind


def test_train_flops_by_hand():
    # 6 N T + 12 L d T^2 per sequence, + 2 N_vit per patch: N = 1000, N_vit = 50, L = 2, d = 8
    assert M.train_flops((1000, 50, 2, 8), [10, 20], 7) == 6 * 1000 * 30 + 12 * 2 * 8 * (100 + 400) + 2 * 50 * 7
    # the attention width of Qwen3-VL-4B is 32 heads x 128 = 4096, not its hidden size 2560
    config, cls, _ = M.make_config(*M.REAL["qwen3-vl-4b"], M.tiny_tokenizer(), M.REAL_VOCAB)
    with torch.device("meta"):
        assert M.flop_sizes(cls(config))[2:] == (36, 4096)


def test_real_architectures_have_the_released_sizes():
    """`model.py --random` builds the released configs: 3.75 B parameters for Qwen2.5-VL-3B and 4.44 B for
    Qwen3-VL-4B with the vocabulary at 151,936 rows (counted on the meta device, nothing allocated)."""
    tok = M.tiny_tokenizer()
    for name, billions in (("qwen2.5-vl-3b", 3.75), ("qwen3-vl-4b", 4.44)):
        config, cls, _ = M.make_config(*M.REAL[name], tok, M.REAL_VOCAB)
        with torch.device("meta"):
            n = sum(p.numel() for p in cls(config).parameters())
        assert abs(n / 1e9 - billions) < 0.005, (name, n)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_attention_calls_do_not_grow_with_frames(tiny, family):
    """The ViT's windows (Qwen2.5-VL) and frames (Qwen3-VL) go through one SDPA call per distinct window
    length: the same count for 10 and 40 frames, and the same features as the per-window loop, also
    when windows differ in size (a 168 x 112 frame has 8 x 8 and 4 x 8 windows)."""
    import torch.nn.functional as F
    model, processor = M.load(tiny[family])
    model.eval()
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    calls, sdpa = [0], F.scaled_dot_product_attention

    def counting(*a, **k):
        calls[0] += 1
        return sdpa(*a, **k)

    def features(n, h=112, w=112, impl="flash_windows"):
        model.config.vision_config._attn_implementation = impl
        pv, grid, _ = fmt.images(np.random.default_rng(n).integers(0, 255, (n, 2, h, w, 3), dtype=np.uint8))
        calls[0] = 0
        with torch.no_grad():
            out = torch.cat(model.model.get_image_features(pv, grid).pooler_output)
        return out, calls[0]

    F.scaled_dot_product_attention = counting
    try:
        (_, c10), (_, c40) = features(10), features(40)
        assert c10 == c40 == model.config.vision_config.depth, (c10, c40)
        for h, w in ((112, 112), (168, 112)):
            batched, n_batched = features(3, h, w)
            looped, n_looped = features(3, h, w, "sdpa")
            assert torch.allclose(batched, looped, atol=1e-5) and n_batched < n_looped, (h, w, n_batched, n_looped)
    finally:
        F.scaled_dot_product_attention = sdpa


def test_frozen_vit_stays_out_of_the_backward_under_checkpointing(tiny):
    """Activation checkpointing made the frozen tower's activations require grad, so the backward went
    through it (ENVIRONMENT.md: 22% of the CUDA time at 3B). After sft.wrap they do not."""
    model, processor = M.load(tiny["qwen2_5_vl"])
    model.train()
    sft.wrap(model, sft.get_args(["--grad_ckpt"]), False, "cpu")
    seen = []
    model.model.visual.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    pv, grid, _ = fmt.images(np.zeros((2, 2, 56, 56, 3), np.uint8))
    model.model.get_image_features(pv, grid)
    assert seen == [False]
    assert model.model.language_model.layers[0].gradient_checkpointing  # the LM still checkpoints


def test_policies_keep_their_masks_on_the_logits_device(tiny):
    """A vocabulary mask built on the CPU meets logits on the model's device (on a GPU: CUDA). With logits
    on the meta device any mismatch raises "not on the expected device"; what may fail is only the final
    copy of the chosen ids to the host, which meta tensors cannot do."""
    model, processor = M.load(tiny["qwen2_5_vl"])
    fmt = data.ChatFormat(processor, 2)
    never = M.vocab_mask(model, fmt.tok)
    logits = torch.zeros(3, len(never), device="meta")
    for policy, call in ((infer.Greedy(fmt, 2, None, 8, never), "first"), (infer.Greedy(fmt, 2, 0.3, 8, never), "first"),
                         (infer.Greedy(fmt, 2, None, 8, never), "next")):
        with pytest.raises(NotImplementedError, match="meta"):  # "Cannot copy out of meta tensor": the .tolist()
            getattr(policy, call)(logits)
    assert infer.Greedy(fmt, 2, None, 8, never).mask(logits).device.type == "meta"


def test_sft_memory_does_not_scale_with_vocabulary_times_length(tmp_path, synth):
    """2 SFT steps and an eval with the tiny model's vocabulary padded to 151,936 rows (as the real ones are)
    cost little more than those rows' parameters, gradients and Adam state (4 x 78 MB): logits are made
    at the supervised positions only. Before that fix the padded run peaked at 17.2 GB against 0.95 GB."""
    peaks = {}
    for name, vocab in (("plain", None), ("padded", M.REAL_VOCAB)):
        path = M.build_tiny("qwen2_5_vl", str(tmp_path / name), vocab_size=vocab)
        out = run_py("sft.py", "--model", path, "--data", str(synth / "train.jsonl"), "--val", str(synth / "val.jsonl"),
                     "--levels", "0,1", "--batch", "4", "--max_steps", "2", "--log_every", "1", "--eval_every", "2",
                     "--eval_samples", "2", "--out", str(tmp_path / f"run-{name}"), env={"OMP_NUM_THREADS": "1"})
        peaks[name] = float(re.findall(r"mem ([0-9.]+) GiB RSS", out)[-1])
    rows = (M.REAL_VOCAB - 653) * 128 * 4 * 4 / 2**30  # fp32 parameter, gradient, two Adam moments
    assert peaks["padded"] - peaks["plain"] < rows + 0.6, peaks


def test_cli_flags_take_both_spellings():
    assert data.cli_args(["--max-new", "3", "--judge-url=http://x/v1", "--levels", "", "-q", "--max_steps", "2"]) == \
        ["--max_new", "3", "--judge_url=http://x/v1", "--levels", "", "-q", "--max_steps", "2"]
    assert infer.get_args(["--max-new", "5", "--ask-at", "2"]).max_new == 5 and infer.get_args(["--max_new", "6"]).max_new == 6
    assert grpo.get_args(["--judge-url", "u", "--max-new", "4"]).judge_url == "u"
    assert sft.get_args(["--max-steps", "7", "--eval-every", "0"]).max_steps == 7


def test_log_lines_write_nan_as_null():
    line = data.json_line({"step": 3, "auc": float("nan"), "gnorm": None, "loss": 0.5})
    assert "NaN" not in line and json.loads(line) == {"step": 3, "auc": None, "gnorm": None, "loss": 0.5}


def test_presets_and_stages_leave_given_flags_alone():
    # a flag given at its global default still beats the preset's or the stage's value
    assert grpo.get_args(["--preset", "qwen2.5-vl-3b", "--backend", "hf"]).backend == "hf"
    assert grpo.get_args(["--preset", "qwen2.5-vl-3b"]).backend == "vllm"
    assert sft.get_args(["--stage", "narrate", "--max-steps", "300"]).max_steps == 300
    assert sft.get_args(["--stage", "narrate"]).max_steps == 600 and sft.get_args([]).max_steps == 300


def test_empty_annotation_file_is_named(tmp_path, tiny):
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(data.AnnotationError, match=rf"{re.escape(empty)}: no samples"):
        data.load_annotations(empty)
    for extra in (["--baseline", "oracle"], ["--model", tiny["qwen2_5_vl"]]):
        with pytest.raises(data.AnnotationError, match=re.escape(empty)):
            bench.main(["--ann", empty, *extra])


def test_video_times_checked_when_the_stream_reads_the_video(trained, synth, tmp_path, capsys):
    """Without `duration` the annotation's times can only be checked against the video when it is decoded:
    a late answer is then a warning that names the file, the line and the sample. By hand first."""
    s = {"id": "a", "where": "f.jsonl:3", "video_path": "v.mp4", "query_time": 2.0, "duration": 30.0,
         "answers": [{"time": 31.0, "text": "x"}, {"start": 1.0, "end": 5.0, "text": "y"}]}
    assert data.check_video_times(dict(s, duration=20.0, answers=s["answers"][1:]), 20.0) == []
    assert data.check_video_times(dict(s, duration=20.5, answers=s["answers"][1:]), 20.0) == []  # a container's rounding
    msgs = data.check_video_times(s, 20.0)
    assert len(msgs) == 2 and all(m.startswith("f.jsonl:3: sample a (v.mp4): ") for m in msgs)
    assert "duration 30.0 is longer than the video (20.0 s)" in msgs[0] and "answer time 31 is beyond" in msgs[1]
    rows = [json.loads(l) for l in open(synth / "test.jsonl")][:2]
    for r in rows:
        r["video"] = str(synth / r["video"])
        r.pop("duration")
    rows[1]["answers"].append({"time": 999.0, "text": "too late"})
    ann = write_jsonl(tmp_path / "late.jsonl", rows)
    infer.predict_file(infer.get_args(["--model", trained, "--ann", ann, "--out", str(tmp_path / "p.jsonl")]))
    err = capsys.readouterr().err
    assert f"warning: {ann}:2: sample {rows[1]['id']}" in err and "answer time 999 is beyond the end of the video" in err
    assert f"{ann}:1:" not in err


def test_directories_without_a_checkpoint_are_named(trained, synth, tmp_path, tiny):
    """A run that died before its first save leaves --out with log.jsonl only: every command that takes a
    model directory says so instead of failing inside the tokenizer loader; --resume starts afresh."""
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "log.jsonl").write_text('{"step": 1}\n')
    msg = rf"{re.escape(str(bare))} holds no checkpoint \(no config.json\); it holds: log.jsonl"
    with pytest.raises(FileNotFoundError, match=msg):
        M.load(str(bare))
    with pytest.raises(data.UserError, match="--model " + msg):
        bench.main(["--ann", str(synth / "test.jsonl"), "--model", str(bare)])
    with pytest.raises(data.UserError, match="--model " + msg):
        grpo.main(grpo.get_args(["--model", str(bare), "--data", str(synth / "train.jsonl"), "--out", str(tmp_path / "g")]))
    r = subprocess.run([sys.executable, "infer.py", "--model", str(bare), "--ann", str(synth / "test.jsonl")], capture_output=True, text=True)
    assert r.returncode == 2 and re.search("error: --model " + msg, r.stderr) and not (bare / "preds-test.jsonl").exists(), r.stderr[-500:]
    out = run_py("sft.py", "--model", tiny["qwen2_5_vl"], "--data", str(synth / "train.jsonl"), "--val", "", "--out", str(bare),
                 "--resume", "--max_steps", "1", "--batch", "2")
    assert "holds no checkpoint yet (it holds: log.jsonl)" in out and M.latest(str(bare)) == str(bare)
    # a save cut off mid-swap: the finished out.tmp is swapped in; a half-written one is named
    cut = tmp_path / "cut"
    shutil.copytree(trained, str(cut) + ".tmp")
    assert os.path.isfile(str(cut) + ".tmp/trainer_state.pt")
    M.finish_save(str(cut))
    assert M.latest(str(cut)) == str(cut) and not os.path.exists(str(cut) + ".tmp")
    half = tmp_path / "half"
    half.mkdir()
    (half / "log.jsonl").write_text("")
    shutil.copytree(trained, str(half) + ".tmp", ignore=shutil.ignore_patterns("trainer_state.pt"))
    M.finish_save(str(half))  # not whole: left alone
    with pytest.raises(FileNotFoundError, match="half.tmp is a save that was cut off"):
        M.load(str(half))


def kill_and_resume(script, args, out, at_step, env):
    """Start `script`, SIGKILL it once its log shows `at_step`, then --resume it to the end."""
    p = subprocess.Popen([sys.executable, script, *args, "--out", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, **env})
    log = os.path.join(out, "log.jsonl")
    while p.poll() is None:
        steps = [json.loads(l).get("step", 0) for l in open(log) if l.endswith("\n")] if os.path.exists(log) else []
        if steps and max(steps) >= at_step:
            p.kill()
            break
        time.sleep(0.05)
    p.wait()
    assert p.returncode == -9, f"{script} ended (rc {p.returncode}) before step {at_step}: make the run longer"
    run_py(script, *args, "--out", out, "--resume", env=env)


def same_weights(a, b):
    sa, sb = (M.load(d)[0].state_dict() for d in (a, b))
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_same_weights(tiny, trained, synth, tmp_path):
    """sft.py and grpo.py (with --eval_every 0, no periodic eval) killed with SIGKILL mid-run and resumed end
    with the weights of an uninterrupted run, and log every step once (one thread: bit-exact)."""
    env = {"OMP_NUM_THREADS": "1"}
    common = ["--model", tiny["qwen2_5_vl"], "--data", str(synth / "train.jsonl"), "--val", "", "--levels", "0,1", "--batch", "4",
              "--micro_batch", "2", "--lr", "3e-3", "--max_steps", "10", "--save_every", "3", "--log_every", "1", "--grad_clip", "0"]
    run_py("sft.py", *common, "--out", str(tmp_path / "sft-a"), env=env)
    kill_and_resume("sft.py", common, str(tmp_path / "sft-b"), 7, env)
    assert same_weights(tmp_path / "sft-a", tmp_path / "sft-b") == 0
    text = open(tmp_path / "sft-b" / "log.jsonl").read()
    assert [json.loads(l)["step"] for l in text.splitlines()] == list(range(1, 11))
    assert "NaN" not in text and json.loads(text.splitlines()[0])["gnorm"] is None  # --grad_clip 0: null, not NaN
    common = ["--model", trained, "--data", str(synth / "train.jsonl"), "--val", str(synth / "val.jsonl"), "--levels", "0,1",
              "--batch", "2", "--group", "2", "--max_new", "8", "--eval_samples", "2", "--eval_every", "0", "--max_steps", "4",
              "--save_every", "2"]
    run_py("grpo.py", *common, "--out", str(tmp_path / "grpo-a"), env=env)
    kill_and_resume("grpo.py", common, str(tmp_path / "grpo-b"), 3, env)
    assert same_weights(tmp_path / "grpo-a", tmp_path / "grpo-b") == 0
    steps = [json.loads(l)["step"] for l in open(tmp_path / "grpo-b" / "log.jsonl")]
    assert steps == [0] + list(range(1, 5)), steps  # step 0: the eval before training; --eval_every 0: none in between
    # killed during its first eval, before any checkpoint: the resumed run starts a fresh log
    kill_and_resume("grpo.py", common + ["--eval_samples", "4"], str(tmp_path / "grpo-c"), 0, env)
    steps = [json.loads(l)["step"] for l in open(tmp_path / "grpo-c" / "log.jsonl")]
    assert steps == [0] + list(range(1, 5)), steps


# -----------------------------------------------------------------------------
# The GPU step of the real architectures, measured on a CPU (costs.py): budgets for host syncs, kernels and
# memory. Before issue 19 (measured with ../shared/gpu/sim): an SFT step of 201 frames had 811 host syncs
# and 13,178 kernels, a silent streamed turn 43 syncs and 3,684 kernels.

import costs  # noqa: E402


@pytest.mark.slow
def test_sft_step_of_3b_at_201_frames_keeps_its_budgets():
    """201 frames of 448 px (29,138 tokens), bf16 parameters, no FSDP, LM checkpointed, ViT frozen, fused AdamW.
    The mrope positions and the ViT's indices come from the host: the syncs left are the loss's boolean
    indexing and transformers' checks. The memory holds where it was: 24.4 GiB in the first step (the
    simulator's number before the change), 30.3 GiB in later ones, whose forward and backward run beside
    the AdamW states."""
    model, fmt = costs.build("qwen2.5-vl-3b", 448)
    meter, first, item = costs.sft_step(model, fmt, 201)
    assert len(item["input_ids"]) == 29138
    assert sum(meter.syncs.values()) <= 20, meter.syncs
    assert meter.kernels <= 11000, meter.kernels
    assert first <= 25 * costs.GIB and meter.peak <= 31 * costs.GIB, (first / costs.GIB, meter.peak / costs.GIB)
    assert meter.sdpa["math"] == 0, meter.sdpa  # no attention holds its T x T scores


@pytest.mark.parametrize("name, syncs", [("qwen2.5-vl-3b", 3), ("qwen3-vl-4b", 9)])
def test_silent_streamed_turn_keeps_its_budgets(name, syncs):
    """A silent turn of infer.Streams (one 448-px frame, ~140 tokens) costs the same whatever the context:
    few host syncs (the decision's read-back and transformers' placeholder check, 2; Qwen3-VL adds 6 for its
    deepstack's boolean indexing inside transformers; the ViT's split sizes come from the host, memory.encode),
    at most 3,200 kernels."""
    model, fmt = costs.build(name, 448)
    meter, S = costs.streamed_turn(model, fmt, turns=3)
    assert sum(meter.syncs.values()) <= syncs, meter.syncs
    assert meter.kernels <= 3200, meter.kernels
    assert meter.sdpa["math"] == 0, meter.sdpa


@pytest.mark.parametrize("name", list(M.REAL))
def test_compiled_turn_reads_nothing_back(name):
    """infer.py --compile's code path (compiled.StaticTurn, run uncompiled: torch.compile does not run on the meta
    device) reads no value back inside the forward, which a CUDA graph needs: the turn's one host sync is the
    decision's read-back, where the eager turn has 2 (3B) and 8 (4B)."""
    import compiled
    model, fmt = costs.build(name, 448)
    meter, S = costs.streamed_turn(model, fmt, turns=3, turn=compiled.StaticTurn(model, 1, backend=None))
    assert sum(meter.syncs.values()) == 1, meter.syncs
    assert meter.sdpa["math"] == 0, meter.sdpa


@pytest.mark.slow
def test_rollout_rebuild_at_the_presets_window_allocates_nothing_quadratic():
    """GRPO's HF rollout reaches its first window rebuild at turn 251 (--window 200 --chunk 50), its rows
    ~29k tokens each. Rows padded to one length made transformers build a dense (n, 1, L, L) mask, 13.5 GB
    at the preset's 16 rows; row by row nothing as large as one row's L x L bytes is allocated."""
    model, fmt = costs.build("qwen2.5-vl-3b", 448)
    meter, L = costs.rebuild(model, fmt, rows=16)
    assert L > 29000
    assert meter.biggest < L * L, (meter.biggest, L * L)


@pytest.mark.parametrize("name", list(M.REAL))
def test_vit_attention_calls_stay_flat_in_the_number_of_frames(name):
    """The vision tower of the real architectures makes as many SDPA calls for 200 frames as for 20."""
    model, fmt = costs.build(name, 448)
    calls = []
    for n in (20, 200):
        pv, grid, _ = fmt.images(np.zeros((n, 1, 8, 8, 3), np.uint8))
        meter = costs.Meter()
        with costs.simulated_gpu(meter), torch.no_grad():
            model.model.get_image_features(pv, grid.to("meta"), **M.vision_inputs(model, grid, "meta"))
        calls.append(sum(meter.sdpa.values()))
    assert calls[0] == calls[1] <= 3 * model.config.vision_config.depth, calls


@pytest.mark.parametrize("family", FAMILIES)
def test_host_positions_equal_the_models_own_in_a_padded_batch(tiny, synth, family):
    """sft.supervised_logits and grpo.token_logp pass mrope positions computed on the host (and the ViT's
    indices): the logits equal a forward that lets the model compute them, in a right-padded batch."""
    from contextlib import nullcontext
    model, processor, fmt, out = encoded(tiny, family, synth, n=2)
    model.eval()
    items = [x for _, _, x in out]
    if len(items[0]["input_ids"]) == len(items[1]["input_ids"]):  # (the end of the last turn: text, no image)
        items[1] = {**items[1], **{k: items[1][k][:-3] for k in ("input_ids", "labels", "classes", "mm_token_type_ids")}}
    b = data.collate(items, fmt.tok.pad_token_id)
    assert (b["attention_mask"] == 0).any()
    with torch.no_grad():
        got, _, keep = sft.supervised_logits(model, b, "cpu", nullcontext())
        ref = model(**data.model_inputs(b)).logits[keep]
        pos = M.rope_positions(model, b["input_ids"], b["mm_token_type_ids"], b["image_grid_thw"], b["attention_mask"])
        own = model.model.compute_3d_position_ids(input_ids=b["input_ids"], inputs_embeds=None, image_grid_thw=b["image_grid_thw"],
                                                  video_grid_thw=None, attention_mask=b["attention_mask"], past_key_values=None,
                                                  mm_token_type_ids=b["mm_token_type_ids"])
    assert torch.equal(pos, own)
    assert torch.allclose(got, ref, atol=1e-5)
    # made per conversation in the training loop's prefetch thread, padded by data.collate: the same positions
    assert torch.equal(data.collate(sft.with_positions(model, items), fmt.tok.pad_token_id)["position_ids"], own)


def test_estimate_prints_allocated_memory_flops_kernels_and_syncs():
    out = run_py("costs.py", "qwen2.5-vl-3b", "--frames", "6", "--world", "4")
    assert "ALLOCATED" in out and "lower bound" in out and "FSDP over 4 GPUs" in out, out
    assert re.search(r"SFT step: peak [0-9.]+ GiB", out) and re.search(r"[0-9,]+ kernels, \d+ host syncs", out), out


# -----------------------------------------------------------------------------
# Every command line answers bad input with one line (issue 28): `error: ...` naming the flag, the file, the
# line or the field, exit status 2 (data.run_cli), no traceback, and nothing left that looks like finished work.
# {tiny} is a tiny model, {synth} the synthetic fixture, {video} one of its 17-s test videos, {tmp} a folder
# that holds bad.jsonl (a line without 'task') and novideo.jsonl (two samples whose videos are absent).

BAD_INPUTS = [  # (command line, words of the error line, paths that must not exist afterwards)
    ("sft.py --model {tiny} --data {tmp}/absent.jsonl --val= --out {tmp}/o", ["--data", "absent.jsonl: annotation file not found"], ["o"]),
    ("sft.py --model {tiny} --data {tmp}/bad.jsonl --val= --out {tmp}/o", ["bad.jsonl:1: field 'task': missing"], ["o"]),
    ("sft.py --model {tmp}/absent --data {synth}/train.jsonl --val= --out {tmp}/o", ["--model", "absent: no such model directory"], ["o"]),
    ("sft.py --model {tiny} --data {synth}/train.jsonl --val {tmp}/typo.jsonl --out {tmp}/o", ["--val", "typo.jsonl", "not found"], ["o"]),
    ("sft.py --model {tiny} --data {synth}/train.jsonl --val= --batch 0 --out {tmp}/o", ["--batch 0: must be > 0"], ["o"]),
    ("grpo.py --model {tiny} --data {synth}/train.jsonl --val= --group 0 --out {tmp}/o", ["--group 0: must be >= 2"], ["o"]),
    ("grpo.py --model {tiny} --data {tmp}/novideo.jsonl --val= --out {tmp}/o", ["novideo.jsonl:1: field 'video': video file not found"], ["o"]),
    ("model.py --show 0 --data {tmp}/absent", ["absent/train.jsonl: annotation file not found"], []),
    ("model.py --show 99 --data {synth} --model {tiny}", ["--show 99", "train.jsonl has 14 samples"], []),
    ("infer.py --model {tiny} --video {video} --question Q --ask_at 500", ["--ask_at 500: must be within the video", "17.0 s"], []),
    ("infer.py --model {tiny} --video {video} --question Q --ask_at -5", ["--ask_at -5: must be within the video"], []),
    ("infer.py --model {tiny} --ann {tmp}/novideo.jsonl --out {tmp}/p.jsonl",
     ["2 of 2 samples failed to stream (video file not found: 2", "p.errors.jsonl", "--allow_failed"], []),
    ("bench.py --model {tiny} --ann {tmp}/novideo.jsonl --preds {tmp}/b.jsonl",
     ["2 of 2 samples failed to stream (video file not found: 2", "b.errors.jsonl", "--allow_failed"], ["b.results.json"]),
    ("bench.py --table {tmp}/absent", ["--table", "absent: no such run folder"], []),
    ("formats.py --from_ovo {tmp}/bad.jsonl --out {tmp}/f.jsonl", ["bad.jsonl: expected OVO-Bench's items", "got dict"], ["f.jsonl"]),
    ("rewards.py --make_rubrics {tmp}/absent.jsonl --offline", ["absent.jsonl: annotation file not found"], []),
    ("synthetic.py --levels x --out {tmp}/syn", ["--levels x"], ["syn"]),
    ("costs.py qwen2.5-vl-3b --frames 0", ["--frames 0: must be > 0"], []),
    ("infer.py --model {tiny} --ann {tmp}/novideo.jsonl --backend vllm --memory decay --max_len 900",
     ["--memory decay runs on the HF backend", "drop --backend vllm"], []),
    ("infer.py --model {tiny} --ann {tmp}/novideo.jsonl --backend vllm --activation {tiny}", ["--activation runs on the HF backend"], []),
    ("infer.py --model {tiny} --ann {tmp}/novideo.jsonl --activation {tiny} --out {tmp}/p.jsonl", ["--activation", "not an activation model"], ["p.jsonl"]),
    ("infer.py --speed --memory decay", ["--memory decay needs --max_len"], []),
    ("infer.py --speed --speed_turns 181", ["--speed_turns 181: must be >= 193", "turns 168-192"], []),
    ("infer.py --speed --model {tmp}/nomodel", ["--model", "nomodel"], []),
]


@pytest.mark.parametrize("cmd, words, absent", BAD_INPUTS, ids=[re.sub(r"\W+", "-", c.split(" ", 1)[0][:-3] + " " + w[0][:30]).strip("-") for c, w, _ in BAD_INPUTS])
def test_every_command_line_answers_bad_input_with_one_line(cmd, words, absent, tiny, synth, tmp_path):
    rows = [json.loads(l) for l in open(synth / "test.jsonl")][:2]
    write_jsonl(tmp_path / "novideo.jsonl", [dict(r, video=f"absent/{r['id']}.mp4") for r in rows])
    write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "video": "v.mp4"}])
    argv = cmd.format(tiny=tiny["qwen2_5_vl"], synth=synth, tmp=tmp_path, video=synth / "videos" / "test-00000.mp4").split()
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    out = r.stdout + r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in out and len(errors) == 1, out[-3000:]
    assert r.stderr.rstrip().splitlines()[-1] == errors[0] and all(w in errors[0] for w in words), errors[0]
    assert not [p for p in absent if (tmp_path / p).exists()]


# -----------------------------------------------------------------------------
# The repo's shape (issue 21): files import each other bottom-up, functions fit on a screen


def our_imports(path, ours):
    """The files of ours that `path` imports, anywhere in it (an import inside a function counts too)."""
    names = set()
    for n in ast.walk(ast.parse(open(path).read())):
        if isinstance(n, ast.Import):
            names |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            names.add(n.module.split(".")[0])
    return names & ours


def test_no_import_circle_and_no_function_over_80_lines():
    root = os.path.dirname(os.path.abspath(__file__))
    files = {f[:-3]: os.path.join(root, f) for f in os.listdir(root) if f.endswith(".py") and not f.startswith("test_")}
    deps = {m: our_imports(p, set(files)) - {m} for m, p in files.items()}
    assert deps["data"] == set(), deps["data"]  # the bottom: the format's constants and the CLI helpers
    order, left = [], dict(deps)
    while left:  # peel the files whose imports are all placed: what never peels is a circle
        free = sorted(m for m, d in left.items() if d <= set(order))
        assert free, f"import circle among {sorted(left)}: {left}"
        order += free
        for m in free:
            del left[m]
    long = [f"{m}.{n.name} {n.end_lineno - n.lineno + 1}" for m, p in files.items() for n in ast.walk(ast.parse(open(p).read()))
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, long
