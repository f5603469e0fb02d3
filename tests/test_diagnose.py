"""The diagnosis script: its probe measures what a linear read-out can tell, and it runs end to end."""
import json

import torch

from tokensieve.eval.shapeworld import diagnose, tiny_models, train_tiny
from tokensieve.testing import make_tokenizer


def test_probe_reads_a_linear_signal_and_not_noise():
    torch.manual_seed(0)
    x = torch.randn(400, 16)
    signal = (x[:, 3] > 0).long()  # one feature decides the class
    assert diagnose._probe(x, signal, 2) >= 0.95
    noise = torch.randint(0, 2, (400,))
    assert diagnose._probe(x, noise, 2) <= 0.7


def test_diagnose_runs_on_a_checkpoint(tmp_path):
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    model, proc = tiny_models.BUILDERS["llava"](tok)
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    diagnose.main([str(tmp_path / "m"), "--n", "8", "--videos", "4", "--out", str(tmp_path / "d.json")])
    result = json.loads((tmp_path / "d.json").read_text())
    n_layers = model.config.text_config.num_hidden_layers
    assert all(len(v) == n_layers for v in result["object_mass"].values())
    assert all(0.0 <= m <= 1.0 for v in result["object_mass"].values() for m in v)
    assert len(result["left_right_probe"]["answer_token_after_layer"]) == n_layers + 1
    assert sum(v["n"] for v in result["accuracy"].values()) == 8
    look = result["look_back"]
    heads = model.config.text_config.num_attention_heads
    for key in ("seen_mass_on_previous_frame", "new_mass_on_first_token"):
        assert len(look[key]) == n_layers and all(len(h) == heads and 0 <= min(h) <= max(h) <= 1 for h in look[key])
    assert len(look["novelty_probe_after_layer"]) == n_layers + 1 and look["n_tokens"] > 0
    count = result["distinct_count"]
    assert count["n"] == 4 and sum(c["n"] for c in count["by_count"].values()) == 4
    assert set(count["by_count"]) <= {"1", "2", "3", "4", "5"}  # the world's videos show 2-5 objects
    assert all(0.0 <= c["share_on_new_frames"] <= 1.0 for c in count["by_count"].values())
    assert len(count["count_probe_after_layer"]) == n_layers + 1


def test_diagnose_reads_qwen2_vl_videos_natively_by_default(tmp_path):
    """The video probes read a Qwen2-VL's videos as the engine does (native), or as frames when asked; the
    distinct-count questions are answered in both (4 videos each)."""
    tok = make_tokenizer(tuple(train_tiny.vocabulary(n=300)))
    model, proc = tiny_models.BUILDERS["qwen2_vl"](tok)
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    for flags, mode in (([], "native"), (["--video-mode", "frames"], "frames")):
        out = tmp_path / f"{mode}.json"
        diagnose.main([str(tmp_path / "m"), "--n", "4", "--videos", "4", "--out", str(out), *flags])
        result = json.loads(out.read_text())
        assert result["video_mode"] == mode and result["distinct_count"]["n"] == 4
        assert result["look_back"]["n_tokens"] > 0
