"""A model family is one adapter module + one registry entry (issue 42): each registered family's module
provides what the tests, the shape world and the bench build its models from, and a family added to the
registry alone is picked up by ``tokensieve.testing`` and the bench's model list."""
import json
import os
import sys
import types

import pytest

import tokensieve
from tokensieve import testing
from tokensieve.engine import adapters
from tokensieve.engine.adapters import ADAPTERS, FAMILY_MEMBERS, family_module
from tokensieve.eval.bench import models as bench_models

from conftest import noise_image

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval", "bench", "configs")


@pytest.mark.parametrize("family", list(ADAPTERS))
def test_the_family_module_provides_everything(family):
    module = family_module(family)
    assert module.__name__ == ADAPTERS[family].__module__
    missing = [m for m in FAMILY_MEMBERS if not hasattr(module, m)]
    assert not missing, f"{module.__name__} lacks {missing}"
    assert isinstance(module.CHAT_TEMPLATE, str) and "add_generation_prompt" in module.CHAT_TEMPLATE
    assert callable(module.tiny_model) and callable(module.processor)
    vocab = testing.tokenizer_for(family).get_vocab()  # placeholders beyond SPECIAL are added (smolvlm's markers)
    assert module.PLACEHOLDERS and all(token in vocab for token in module.PLACEHOLDERS.values())
    if module.BENCH is not None:  # its configuration is a checkpoint's config.json of this family
        assert set(module.BENCH) in ({"model", "image"}, {"model", "video"})
        raw = json.load(open(os.path.join(CONFIGS, f"{module.BENCH['model']}.json")))
        assert raw["model_type"] == family


@pytest.mark.parametrize("family", list(ADAPTERS))
def test_make_tiny_builds_a_model_that_loads_and_generates(family, tiny_path, engine_for):
    engine = engine_for(family)
    cfg, tok = engine.model.config, engine.processor.tokenizer
    assert cfg.model_type == family
    for field, token in family_module(family).PLACEHOLDERS.items():  # the config's ids are the tokenizer's
        assert getattr(cfg, field) == tok.convert_tokens_to_ids(token)
    assert open(os.path.join(tiny_path(family), "chat_template.jinja")).read() == family_module(family).CHAT_TEMPLATE
    res = engine.generate("what is the colour", images=[noise_image(0)], max_new_tokens=3)
    assert res.stats["visual_tokens"] > 0 and res.stats["new_tokens"] >= 1


@pytest.mark.parametrize("family", list(ADAPTERS))
def test_the_class_level_capabilities_match_the_loaded_model(family, engine_for):
    """``cls_tower`` / ``hooked_tower`` decide, before any model is loaded, which pruners a family runs
    (``tokensieve pruners``, check_fit): they must say what a loaded model of the family really has."""
    ad = engine_for(family).adapter
    assert type(ad).hooked_tower == (ad.vision_layers is not None)
    if type(ad).cls_tower:  # a CLS token: the tower's sequence is one longer than its patches
        vc = engine_for(family).model.config.vision_config
        emb = ad.vision_layers[0]  # the hooked tower's first layer sees [n, 1 + P, C]
        seen = []
        handle = emb.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
        try:
            engine_for(family).generate("what", images=[noise_image(0)], max_new_tokens=1)
        finally:
            handle.remove()
        side = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # noqa: E731 (InternViT: [h, w])
        assert seen and seen[0] == (side(vc.image_size) // side(vc.patch_size)) ** 2 + 1


def test_the_pruners_command_names_the_families_each_pruner_runs_on():
    """holitom reads ``tower.received`` (hooked towers only); cls reads the CLS row where a tower has one and a
    surrogate elsewhere; divprune reads features only."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "tokensieve", "pruners"], capture_output=True, text=True, timeout=120)
    family_of, name = {}, None
    for line in out.stdout.splitlines():
        if line and not line.startswith(" "):
            name = line.split(":")[0]
        elif line.startswith("    families: "):
            family_of[name] = line.strip()
    hooked = [f for f in ADAPTERS if ADAPTERS[f].hooked_tower]
    unhooked = [f for f in ADAPTERS if not ADAPTERS[f].hooked_tower]
    assert family_of["divprune"] == "families: " + ", ".join(ADAPTERS)
    assert family_of["holitom"].startswith(f"families: {', '.join(hooked)}; refused on {', '.join(unhooked)}: holitom "
                                           "reads the vision tower's attention")
    assert "qwen2_vl (surrogate for tower.cls)" in family_of["cls"] and "llava, llava_next," in family_of["cls"]


def _fake_family(llava):
    """A module for a family 'fake_llava': LLaVA-1.5's tiny model with its own placeholder token and turns."""
    module = types.ModuleType("fake_family_module")
    module.PLACEHOLDERS = {"image_token_id": "<picture>"}
    module.CHAT_TEMPLATE = llava.CHAT_TEMPLATE.replace("<image>", "<picture>")
    module.BENCH = {"model": "fake-7b", "image": (336, 336)}

    def processor(config, tok, **image):
        proc = llava.processor(config, tok, **image)
        proc.image_token, proc.chat_template = "<picture>", module.CHAT_TEMPLATE
        return proc

    def tiny_model(tok):
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        cfg = LlavaConfig(vision_config=llava.tiny_clip_vision(), text_config=llava.tiny_llama_text(len(tok)),
                          image_token_id=tok.convert_tokens_to_ids("<picture>"), vision_feature_layer=-2,
                          vision_feature_select_strategy="default")
        return LlavaForConditionalGeneration(cfg), processor(cfg, tok)

    module.processor, module.tiny_model = processor, tiny_model
    return module


def test_a_family_added_to_the_registry_alone_is_picked_up(monkeypatch, tmp_path):
    from tokensieve.engine.adapters import llava

    module = _fake_family(llava)
    adapter = type("FakeAdapter", (llava.LlavaAdapter,), {"family": "fake_llava", "__module__": module.__name__})
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(adapters.ADAPTERS, "fake_llava", adapter)

    assert testing.FAMILIES == ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
                                "gemma3", "internvl", "smolvlm", "glm4v", "llava_onevision1_5",
                                "fake_llava")
    assert bench_models.MODELS[-1] == "fake-7b"
    path = testing.make_tiny("fake_llava", tmp_path / "fake")
    saved = json.load(open(tmp_path / "fake" / "tokenizer.json"))
    picture = {t["content"]: t["id"] for t in saved["added_tokens"]}["<picture>"]  # a new special token
    assert json.load(open(tmp_path / "fake" / "config.json"))["image_token_index"] == picture
    assert picture == len(testing.make_tokenizer().get_vocab())  # after the shared vocabulary: no id moved
    engine = tokensieve.load(path)  # a LLaVA config: the real llava adapter runs it
    try:
        res = engine.generate("what is the colour", images=[noise_image(0)], max_new_tokens=2)
        assert res.stats["visual_tokens"] == 64  # 8 x 8 patches behind the one <picture>
    finally:
        engine.close()


def test_an_unknown_family_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown family 'nosuch'; choose from llava, llava_next"):
        testing.make_tiny("nosuch", tmp_path / "x")
    assert not (tmp_path / "x").exists()
