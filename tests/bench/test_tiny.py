"""Random-weight pairs of real shapes (`bench serve --shapes`): made fast, saved whole, used again."""

from __future__ import annotations

import argparse

import pytest
import torch
from speccascade.bench import tiny
from speccascade.bench.backend.steps import SHAPES
from speccascade.bench.serve import cli
from transformers import AutoModelForCausalLM


def test_a_shaped_pair_loads_whole_with_its_shapes_ties_and_usual_scale(tmp_path, tokenizer):
    drafter, expert = tiny.save_shaped_pair(tmp_path, tokenizer, "tiny-drafter", "tiny-expert")
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
        # Each matrix is its own window of the bank, not the same values again.
        assert not torch.equal(weights["model.layers.0.mlp.up_proj.weight"], weights["model.layers.1.mlp.up_proj.weight"])
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
    (tmp_path / "expert-tiny-expert" / tiny.SHAPE_DONE).unlink()  # a run killed while it saved the expert
    tiny.save_shaped_pair(tmp_path, tokenizer, "tiny-drafter", "tiny-expert")
    assert made[2:] == ["expert-tiny-expert"]
    AutoModelForCausalLM.from_pretrained(first[1])
    with pytest.raises(ValueError, match="unknown model shape 'qwen9-1t'"):
        tiny.save_shaped_pair(tmp_path, tokenizer, "qwen9-1t", "tiny-expert")


def test_shapes_dir_without_shapes_is_refused():
    args = argparse.Namespace(tiny=False, shapes=None, shapes_dir="/tmp/models")
    with pytest.raises(ValueError, match="--shapes-dir='/tmp/models' keeps the models of --shapes"):
        cli.run(args)
