"""
vLLM run for real on the CPU (vllm-cpu 0.32.0), against the HF path: infer.py --backend vllm and grpo.py
--backend vllm. These tests need their own venv (vLLM pins its own stack; vllm_cpu.sh); .ci/run
builds it and runs them:

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m pytest -q test_vllm.py

Elsewhere they are skipped, unless STREAMPRO_VLLM=1 says vLLM must be there (CI).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

if os.environ.get("STREAMPRO_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed here (bash vllm_cpu.sh)")

import data
import model as M
import synthetic

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}


def run_py(*cmd):
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env={**os.environ, **ENV}, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthetic.generate(str(root), n_train=2, n_val=0, n_test=3, levels=(0, 1), workers=1, min_dur=14, max_dur=18)
    return root


def checkpoint(family, out, scale=4.0, seed=None, tokens=data.DECISION_TOKENS):
    """A tiny one-frame-per-turn model saved as a checkpoint (decision tokens in), with the embeddings of
    `tokens` spread apart so its argmax says </Response> on some turns and </Silence> on others (a random
    model's new tokens share one embedding: every decision would tie). The projector trains (GRPO)."""
    m, p = M.load(M.build_tiny(family, str(out) + "-random", frames_per_turn=1))
    ids = [p.tokenizer.convert_tokens_to_ids(t) for t in tokens]
    with torch.no_grad():
        e = m.get_input_embeddings().weight
        g = torch.Generator().manual_seed(seed or {"qwen2_5_vl": 1, "qwen3_vl": 4}[family])
        e[ids] += scale * e.std() * torch.randn(len(ids), e.shape[1], generator=g)
    m.config.streampro_tiny = False
    m.save_pretrained(out)
    p.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {f: checkpoint(f, root / f) for f in FAMILIES}


def preds(path):
    return {r["id"]: r for r in map(json.loads, open(path))}


@pytest.mark.parametrize("family", FAMILIES)
def test_infer_vllm_matches_hf_with_windowing(ckpts, synth, tmp_path, family):
    """Both backends, fp32, a window of 6 turns cut every 4 (so prompts are re-windowed mid-video): the same
    responses (times and texts) and p(</Response>) within 1e-3 at every turn."""
    ann = str(synth / "test.jsonl")
    common = ["--model", ckpts[family], "--ann", ann, "--window", "6", "--chunk", "3", "--dtype", "float32", "--max_new", "8"]
    run_py("infer.py", *common, "--out", str(tmp_path / "hf.jsonl"))
    log = run_py("infer.py", *common, "--backend", "vllm", "--out", str(tmp_path / "vllm.jsonl"))
    hf, vl = preds(tmp_path / "hf.jsonl"), preds(tmp_path / "vllm.jsonl")
    assert hf.keys() == vl.keys() and len(hf) == 3, log[-2000:]
    n_resp = 0
    for i in hf:
        a, b = np.array(hf[i]["p_response"]), np.array(vl[i]["p_response"])
        assert len(a) == len(b) > 10
        assert np.abs(a - b).max() < 1e-3, (i, np.abs(a - b).max())
        assert hf[i]["responses"] == vl[i]["responses"], i
        n_resp += len(hf[i]["responses"])
    assert 0 < n_resp < sum(len(r["p_response"]) for r in hf.values())  # some turns respond, some do not
    assert all(r["text"] for p in vl.values() for r in p["responses"])  # answers cut at --max_new alike (equal above)
    print(f"{family}: {n_resp} responses equal, max |p_hf - p_vllm| "
          f"{max(np.abs(np.array(hf[i]['p_response']) - vl[i]['p_response']).max() for i in hf):.2e}")


def test_infer_vllm_threshold(ckpts, synth, tmp_path):
    """--threshold decides on both backends alike: p(</Response>) >= t responds, whatever the argmax."""
    ann = str(synth / "test.jsonl")
    common = ["--model", ckpts["qwen2_5_vl"], "--ann", ann, "--dtype", "float32", "--max_new", "4", "--threshold", "0.99"]
    run_py("infer.py", *common, "--backend", "vllm", "--out", str(tmp_path / "vllm.jsonl"))
    assert all(not r["responses"] for r in preds(tmp_path / "vllm.jsonl").values())  # p is ~0.002 here: never
    run_py("infer.py", *common[:-1], "0.0", "--backend", "vllm", "--out", str(tmp_path / "all.jsonl"))
    for s in data.load_annotations(ann):  # threshold 0: every turn from the question on responds
        r = preds(tmp_path / "all.jsonl")[s["id"]]
        assert len(r["responses"]) == len(r["p_response"]) - data.question_turn(s["query_time"])


@pytest.mark.parametrize("launch", ["torchrun", "python"])
def test_grpo_vllm_two_steps(synth, tmp_path, launch):
    """Two GRPO steps with vLLM sampling, under torchrun (external_launcher) and in a plain process (the
    engine in-process): finite losses, the sampler's log-probabilities
    equal to the trainer's (< 1e-4 nats per token) in both steps, and so the weights pushed after step 1
    are the ones step 2 samples from: lr 1e-2 moves them far beyond that gap (checked). One video, so
    step 2 streams the same frames again (vLLM's encoder cache must have been reset)."""
    rows = [json.loads(l) for l in open(synth / "train.jsonl")][:1]
    for r in rows:
        r["video"] = str(synth / r["video"])
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # decisions that dominate the text tokens, so a rollout is mostly well-formed and the rewards of a
    # group differ (a format mistake here and there): the update is not zero
    start = checkpoint("qwen2_5_vl", tmp_path / "start", scale=20.0, seed=1, tokens=(data.SILENCE, data.RESPONSE))
    out = tmp_path / "grpo"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if launch == "torchrun" else []
    log = run_py(*launcher, "grpo.py", "--backend", "vllm",
                 "--model", start, "--data", str(train), "--val", "", "--levels", "", "--out", str(out),
                 "--batch", "1", "--group", "4", "--max_steps", "2", "--save_every", "1", "--lr", "1e-2", "--temperature", "0.7",
                 "--window", "6", "--chunk", "3", "--max_new", "6", "--eval_samples", "0")
    steps = [json.loads(l) for l in open(out / "log.jsonl")]
    assert [s["step"] for s in steps] == [1, 2], log[-3000:]
    for s in steps:
        assert np.isfinite(s["loss"]) and s["gnorm"] is not None and np.isfinite(s["gnorm"]), s
        assert s["logp_gap"] < 1e-4, s
    assert steps[0]["zero_var"] < 1 and steps[0]["gnorm"] > 0, steps[0]  # step 1 moved the weights
    print(f"GRPO with vLLM ({launch}): " + "; ".join(f"step {s['step']} loss {s['loss']:+.4f} gap {s['logp_gap']:.1e} reward {s['reward']:.3f}" for s in steps))
    from safetensors.torch import load_file
    before = load_file(os.path.join(start, "model.safetensors"))
    after = load_file(os.path.join(M.latest(str(out)), "model.safetensors"))
    moved = max((after[k].float() - before[k].float()).abs().max().item() for k in before if "visual.blocks" not in k)
    assert moved > 1e-3, moved
