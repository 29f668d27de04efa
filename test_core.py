"""
Tests: the turn format, the metric, the losses, the rewards, training, inference. CPU only, tiny
random models, nothing downloaded.

    python -m pytest -q test_core.py               # everything (a few minutes on 2 cores)
    python -m pytest -q test_core.py -m "not slow" # the fast part
"""
import json
import os

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
    assert frames.dtype == np.uint8 and frames.shape == (int(s["duration"]), 56, 56, 3)
    assert np.allclose(times, np.arange(len(frames)))
    f2, t2 = data.load_video(s["video_path"], fps=2.0)
    assert len(f2) == 2 * len(frames) and np.allclose(t2[:3], [0, 0.5, 1.0])
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
    fmt = data.ChatFormat(processor)
    out = []
    for s in data.load_annotations(str(synth / "train.jsonl"))[:n]:
        frames, _ = data.load_video(s["video_path"], factor=fmt.factor)
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
    assert M.vocab_mask(raw, tok).sum() == 13
