"""A stage inside the CLIP tower (LLaVA-1.5), against a reference run by hand in the test.

The reference calls the tower's own submodules layer by layer, drops the pruned patch
tokens before layer L, projects the feature layer, places the features in the unmodified
transformers model's input embeddings and hides the pruned slots from every LLM layer.
"""
import torch

from conftest import noise_image
from reference import hidden_slots, reference_model


def _tower_features(model, pixel_values, layer, keep_idx):
    tower = model.model.vision_tower
    h = tower.pre_layrnorm(tower.embeddings(pixel_values))
    layers = tower.encoder.layers
    outs = [h]
    for i, block in enumerate(layers):
        if i == layer:
            h = torch.cat([h[:, :1], h[:, 1:][:, keep_idx]], dim=1)
        out = block(h, None)
        h = out[0] if isinstance(out, tuple) else out
        outs.append(h)
    feat = outs[model.config.vision_feature_layer][:, 1:]  # default strategy: drop CLS
    return model.model.multi_modal_projector(feat)[0]


def test_vision_stage_matches_hand_run_tower(engine_for, tiny_path):
    engine = engine_for("llava")
    img = noise_image(5)
    plan = "uniform:where=vision,layer=1,keep=16,positions=original;fastv:layer=2,keep=6"
    res = engine.generate("what is the colour", images=[img], plan=plan, max_new_tokens=5, output_logits=True)
    lattice = [r * 8 + c for r in (1, 3, 5, 7) for c in (1, 3, 5, 7)]
    assert res.kept[0].tolist() == lattice  # original (8x8 patch grid) coordinates
    assert set(res.kept[1].tolist()) <= set(lattice) and len(res.kept[1]) == 6

    inputs = engine.prepare("what is the colour", images=[img])
    n_layers = engine.model.config.text_config.num_hidden_layers
    alive = [res.kept[0]] * 2 + [res.kept[1]] * (n_layers - 2)
    hide = hidden_slots(inputs["input_ids"], engine.adapter.visual_token_ids, alive)
    n_new = len(res.token_ids) - 1
    hide = {j: torch.cat([h, torch.zeros(1, n_new, dtype=torch.bool)], 1) for j, h in hide.items()}
    ref = reference_model(tiny_path("llava"), hide)
    with torch.no_grad():
        feats = _tower_features(ref, inputs["pixel_values"], layer=1, keep_idx=torch.tensor(lattice))
        ids = torch.cat([inputs["input_ids"], torch.tensor([res.token_ids[:-1]])], 1)
        embeds = ref.get_input_embeddings()(ids)
        slots = (ids[0] == ref.config.image_token_id).nonzero().flatten()
        embeds[0, slots[lattice]] = feats
        logits = ref(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).logits[0, inputs["input_ids"].shape[1] - 1:]
    assert logits.argmax(-1).tolist() == res.token_ids
    torch.testing.assert_close(res.logits, logits.float(), atol=2e-4, rtol=1e-4)
