"""Random-weight pairs of real shapes (`bench serve --shapes`): made fast, saved whole, used again."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors import safe_open
from speccascade.bench import tiny
from speccascade.bench.backend.steps import SHAPES
from speccascade.bench.serve import cli
from transformers import AutoModelForCausalLM


def test_a_shaped_pair_loads_whole_with_its_shapes_ties_and_usual_scale(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(tiny, "WEIGHT_BANK_SIZE", 1 << 14)  # below the matrices' sizes: each is tiled from windows
    drafter, expert = tiny.save_shaped_pair(tmp_path, tokenizer, "tiny-drafter", "tiny-expert")
    # A tied output layer is saved as the embedding alone (to_empty had untied it).
    assert "lm_head.weight" not in safe_open(f"{drafter}/model.safetensors", "pt").keys()
    assert "lm_head.weight" in safe_open(f"{expert}/model.safetensors", "pt").keys()
    for path, shape, tied in ((drafter, "tiny-drafter", True), (expert, "tiny-expert", False)):
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        assert not any(info.values()), info  # nothing missing, unexpected or left to a fresh init
        assert model.config.hidden_size == SHAPES[shape]["hidden_size"]
        assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
        weights = dict(model.named_parameters())
        assert all(torch.equal(w, torch.ones_like(w)) for name, w in weights.items() if name.endswith("norm.weight"))
        assert all(not w.any() for name, w in weights.items() if name.endswith(".bias"))
        matrix = weights["model.layers.0.mlp.up_proj.weight"].float()
        assert 0.015 < matrix.std().item() < 0.025 and matrix.unique().numel() > 1000
        # No two matrices alike, nor two windows of one (the bank's size is half a window apart).
        assert not torch.equal(weights["model.layers.0.mlp.up_proj.weight"], weights["model.layers.1.mlp.up_proj.weight"])
        windows = weights["model.embed_tokens.weight"].view(-1).split(1 << 13)
        assert not any(torch.equal(windows[0], other) for other in windows[1:-1])
        logits = model(torch.arange(1, 17).unsqueeze(0)).logits
        assert torch.isfinite(logits).all()


def test_a_shaped_pair_is_made_once_and_an_interrupted_one_again(tmp_path, tokenizer, monkeypatch):
    made = []
    save = tiny._save_shaped_model
    monkeypatch.setattr(tiny, "_save_shaped_model", lambda path, *args, **kw: made.append(path.name) or save(
        path, *args, **kw))
    first = tiny.save_shaped_pair(tmp_path, tokenizer, "tiny-drafter", "tiny-expert")
    assert tiny.save_shaped_pair(tmp_path, tokenizer, "tiny-drafter", "tiny-expert") == first
    assert made == ["drafter-tiny-drafter", "expert-tiny-expert"]
    (tmp_path / "expert-tiny-expert" / tiny.SHAPE_MARKER).unlink()  # a run killed while it saved the expert
    tiny.save_shaped_pair(tmp_path, tokenizer, "tiny-drafter", "tiny-expert")
    assert made[2:] == ["expert-tiny-expert"]
    AutoModelForCausalLM.from_pretrained(first[1])
    monkeypatch.setattr(tiny, "SHAPE_FORMAT", "weights made another way")  # a later version of this code
    tiny.save_shaped_pair(tmp_path, tokenizer, "tiny-drafter", "tiny-expert")
    assert made[3:] == ["drafter-tiny-drafter", "expert-tiny-expert"]
    for drafter, expert in (("qwen9-1t", "tiny-expert"), ("tiny-drafter", "qwen9-1t")):  # nothing made first
        with pytest.raises(ValueError, match="unknown model shape 'qwen9-1t'"):
            tiny.save_shaped_pair(tmp_path / "other", tokenizer, drafter, expert)
    assert len(made) == 5 and not (tmp_path / "other").exists()


def test_shapes_dir_without_shapes_and_two_pairs_are_refused():
    args = argparse.Namespace(tiny=False, shapes=None, shapes_dir="/tmp/models")
    with pytest.raises(ValueError, match="--shapes-dir='/tmp/models' keeps the models of --shapes"):
        cli.run(args)
    args = argparse.Namespace(tiny=True, shapes="qwen2.5-0.5b,qwen2.5-7b", shapes_dir=None)
    with pytest.raises(ValueError, match="--tiny and --shapes='qwen2.5-0.5b,qwen2.5-7b' each choose the pair"):
        cli.run(args)
