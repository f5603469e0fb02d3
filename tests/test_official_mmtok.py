"""`mmtok` against a reference transcribed from the official code path (Ironieser/MMTok), on fixed signals at
LLaVA-1.5 geometry (24 x 24 = 576 patches; keep 192 / 128 / 64) and the tiny models' (8 x 8 = 64), and through
the engine on the tiny LLaVA and Qwen2-VL (projected tokens, feature-layer states and keyword embeddings
computed here from the model's own modules) so the recorded signals are checked too."""
import math
import re
import types

import pytest
import torch
import torch.nn.functional as F

import tokensieve
from conftest import noise_image
from tokensieve import shipped
from tokensieve.engine.adapters.base import grid_coords
from tokensieve.pruners import StageInput, get_pruner
from tokensieve.pruners import mmtok as mm

# ---- the official code, transcribed ---------------------------------------------------------------

OFFICIAL_NON_VISUAL_WORDS = {  # mmtok/core/text_processor.py, NON_VISUAL_WORDS
    "a", "an", "the",
    "is", "are", "was", "were", "be", "been", "being",
    "have", "has", "had", "do", "does", "did",
    "it", "they", "he", "she", "we", "you", "i",
    "what", "where", "when", "why", "how", "who", "which",
    "and", "or", "but", "so", "if", "then",
    "question", "answer",
    "to", "for", "with", "by", "from", "at", "into", "onto", "upon",
}
OFFICIAL_PROMPT_1 = "Answer the question using a single word or phrase."
OFFICIAL_PROMPT_2 = "Answer with the option's letter from the given choices directly."


def official_extract_keywords_simple(text):
    """mmtok/core/text_processor.py, ``VQATextProcessor.extract_keywords_simple``."""
    if not text:
        return ""
    text = text.replace(OFFICIAL_PROMPT_1, "").replace(OFFICIAL_PROMPT_2, "")
    words = re.compile(r"\b\w+\b").findall(text)
    filtered_words = [w for w in words if w.lower() not in OFFICIAL_NON_VISUAL_WORDS]
    return " ".join(filtered_words) if filtered_words else text


def official_encode_text_with_token_pooling(text, tokenizer, embed_tokens):
    """mmtok/core/mmtok_core.py, ``MMTokCore._encode_text_with_token_pooling`` -> [num_words, hidden_dim]."""
    enc = tokenizer(text.split(), is_split_into_words=True, return_tensors="pt", padding=True, truncation=True)
    input_ids = enc["input_ids"]
    with torch.no_grad():
        tok_emb = embed_tokens(input_ids)[0]
    start_idx = 0
    if input_ids.shape[1] > 1 and input_ids[0, 0].item() == tokenizer.bos_token_id:
        start_idx = 1
    return tok_emb[start_idx:]


def official_greedy_merged_jit_kernel(Combined, k_max, exclude_indices):
    """mmtok/core/semantic_selector.py, ``greedy_merged_jit_kernel`` (unscripted)."""
    total_rows, n = Combined.shape
    device = Combined.device
    dtype = Combined.dtype
    best_Combined = torch.zeros(total_rows, device=device, dtype=dtype)
    score_mask = torch.zeros(n, device=device, dtype=dtype)
    neg_inf_tensor = torch.tensor(float('-inf'), dtype=dtype, device=device)
    if exclude_indices.numel() > 0:
        score_mask.index_fill_(0, exclude_indices, neg_inf_tensor.item())
    selected_indices = torch.zeros(k_max, dtype=torch.long, device=device)
    for i in range(k_max):
        delta = (Combined - best_Combined.unsqueeze(1)).clamp_min_(0).sum(dim=0)
        delta.add_(score_mask)
        best_idx = torch.argmax(delta)
        idx_1d = best_idx.view(1)
        selected_indices[i] = best_idx
        current_col = Combined.index_select(1, idx_1d).squeeze(1)
        score_mask.scatter_(0, idx_1d, neg_inf_tensor)
        best_Combined = torch.maximum(best_Combined, current_col)
    return selected_indices


def official_l2_normalize(x):
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def official_mm_coverage_selection(text_token_embedding, vision_tokens, vision_tokens_clip, target_vision_tokens,
                                   alpha=0.5, tv_temp=0.01, vv_temp=0.2, padding_patch_indices=None):
    """mmtok/core/semantic_selector.py, ``SemanticTokenSelector.mm_coverage_selection`` (both branches: the JIT
    kernel where n >= 500 or k_max >= 20, the default thresholds, else the loop) -> (selected indices, Combined)."""
    device = vision_tokens.device
    x_norm = official_l2_normalize(vision_tokens).float()
    x_clip_norm = official_l2_normalize(vision_tokens_clip).float()
    z_norm = official_l2_normalize(text_token_embedding).float()
    P = z_norm @ x_norm.T
    Q = x_clip_norm @ x_clip_norm.T
    m, n = P.shape
    inv_tv_temp = 1.0 / tv_temp
    inv_vv_temp = 1.0 / vv_temp
    P = F.softmax(P * inv_tv_temp, dim=1) / m
    Q = F.softmax(Q * inv_vv_temp, dim=1) / n
    k_max = min(target_vision_tokens, n)
    Q_weighted = Q * alpha
    Combined = torch.cat([P, Q_weighted], dim=0)
    use_jit = (n >= 500) or (k_max >= 20)
    if padding_patch_indices is not None:
        exclude_indices = torch.tensor(padding_patch_indices, device=device, dtype=torch.long)
    else:
        exclude_indices = torch.empty(0, dtype=torch.long, device=device)
    if use_jit:
        selected_indices = official_greedy_merged_jit_kernel(Combined, k_max, exclude_indices)
    else:
        best_Combined = torch.zeros(m + n, device=device, dtype=torch.float32)
        score_mask = torch.zeros(n, device=device, dtype=torch.float32)
        if padding_patch_indices is not None:
            score_mask[exclude_indices] = float("-inf")
        selected_indices = torch.empty(k_max, dtype=torch.long, device=device)
        neg_inf = float("-inf")
        for i in range(k_max):
            delta = (Combined - best_Combined.unsqueeze(1)).clamp_min_(0).sum(0)
            delta.add_(score_mask)
            best_idx = torch.argmax(delta)
            selected_indices[i] = best_idx
            torch.maximum(best_Combined, Combined[:, best_idx], out=best_Combined)
            score_mask[best_idx] = neg_inf
    selected_indices, _ = selected_indices.sort()
    return selected_indices.tolist(), Combined


def official_kept(text, tokens, tower_states, keep, alpha=0.5, tv=0.02, vv=0.2, padding=None):
    """``MMTokCore.apply_selection`` / ``select_vision_tokens`` on one image (mmtok/core/mmtok_core.py; LLaVA
    defaults of ``mmtok/llava/llava_inject.py``): tower_states [N or 1 + N, C] (a CLS row is stripped)."""
    if tower_states.shape[0] - tokens.shape[0] == 1:
        tower_states = tower_states[1:]
    if tokens.shape[0] <= keep:
        return list(range(tokens.shape[0]))
    return official_mm_coverage_selection(text, tokens, tower_states, keep, alpha, tv, vv, padding)[0]


def official_calculate_padding_patch_indices(original_size, target_size=336, patch_size=14):
    """mmtok/llava/patch_llava.py, ``calculate_padding_patch_indices`` with ``include_overlap=False``."""
    orig_width, orig_height = original_size
    if orig_width == orig_height:
        return []
    num_patches = target_size // patch_size
    if orig_width > orig_height:
        scale_factor = target_size / orig_width
        scaled_height = int(round(orig_height * scale_factor))
        padding_top_336 = (target_size - scaled_height) // 2
        padding_bottom_336 = target_size - scaled_height - padding_top_336
        if scaled_height == target_size:
            return []
        pad_top_rows = padding_top_336 // patch_size
        pad_bot_rows = padding_bottom_336 // patch_size
        padding_patch_indices = []
        for row in range(pad_top_rows):
            for col in range(num_patches):
                padding_patch_indices.append(row * num_patches + col)
        for row in range(num_patches - pad_bot_rows, num_patches):
            for col in range(num_patches):
                padding_patch_indices.append(row * num_patches + col)
    else:
        scale_factor = target_size / orig_height
        scaled_width = int(round(orig_width * scale_factor))
        padding_left_336 = (target_size - scaled_width) // 2
        padding_right_336 = target_size - scaled_width - padding_left_336
        if scaled_width == target_size:
            return []
        pad_left_cols = padding_left_336 // patch_size
        pad_right_cols = padding_right_336 // patch_size
        padding_patch_indices = []
        for col in range(pad_left_cols):
            for row in range(num_patches):
                padding_patch_indices.append(row * num_patches + col)
        for col in range(num_patches - pad_right_cols, num_patches):
            for row in range(num_patches):
                padding_patch_indices.append(row * num_patches + col)
    return padding_patch_indices


# ---- fixed signals ------------------------------------------------------------------------------

def fixed_signals(side, seed, words=7, dim=48, tower_dim=32):
    """Keyword embeddings [M, D], projected tokens [N, D] and feature-layer states [N, C], uneven norms, some
    text rows close to some tokens (so the text term decides)."""
    g = torch.Generator().manual_seed(seed)
    n = side * side
    tokens = torch.randn(n, dim, generator=g) * (0.1 + 3 * torch.rand(n, 1, generator=g)) + 0.2
    tower = torch.randn(n, tower_dim, generator=g) * (0.1 + 2 * torch.rand(n, 1, generator=g))
    near = torch.randint(0, n, (words,), generator=g)
    text = 0.7 * tokens[near] + torch.randn(words, dim, generator=g)
    return text, tokens, tower


def ours(text, tokens, tower, side, keep, **options):
    inp = StageInput(tokens=tokens, keep=keep, coords=grid_coords(side, side), options=options, patches=tower,
                     text_embeds=text)
    return get_pruner("mmtok").select(inp)


CASES = [(24, 192), (24, 128), (24, 64), (24, 16), (8, 32), (8, 16), (8, 8), (8, 24)]


@pytest.mark.parametrize("side,keep", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_official_on_fixed_signals(side, keep, seed):
    text, tokens, tower = fixed_signals(side, seed)
    sel = ours(text, tokens, tower, side, keep)
    want = official_kept(text, tokens, tower, keep)
    assert len(want) == keep and sel.keep_idx.tolist() == want
    _, combined = official_mm_coverage_selection(text, tokens, tower, keep, tv_temp=0.02)
    torch.testing.assert_close(sel.scores, combined.sum(0))  # coverage of each token alone
    assert sel.tokens is None  # nothing merged: the kept projected features go to the LLM as they are


@pytest.mark.parametrize("options", [dict(alpha=0.8), dict(alpha=0.0), dict(tv_temperature=0.01),
                                     dict(vv_temperature=0.5, alpha=2.0)])
def test_options_are_the_official_parameters(options):
    text, tokens, tower = fixed_signals(24, 3)
    want = official_kept(text, tokens, tower, 64, options.get("alpha", 0.5), options.get("tv_temperature", 0.02),
                         options.get("vv_temperature", 0.2))
    assert ours(text, tokens, tower, 24, 64, **options).keep_idx.tolist() == want


def test_tower_states_with_cls_and_padding_exclusion():
    """A CLS row is stripped as the official code does; excluded (padding) patches are never picked."""
    text, tokens, tower = fixed_signals(24, 4)
    cls_first = torch.cat([torch.randn(1, tower.shape[1]), tower])
    pad = official_calculate_padding_patch_indices((640, 427))
    want = official_kept(text, tokens, cls_first, 128, padding=pad)
    kept, _ = mm.mmtok_select(text, tokens, tower, 128, exclude=torch.tensor(pad))
    assert kept.tolist() == want and not set(want) & set(pad)
    assert want != official_kept(text, tokens, tower, 128)  # the exclusion matters here


@pytest.mark.parametrize("size", [(640, 427), (427, 640), (500, 500), (336, 100), (100, 337), (1000, 999),
                                  (33, 1000), (640, 480)])
def test_padding_rule_is_the_official_one(size):
    assert mm.padding_patches(*size) == official_calculate_padding_patch_indices(size)


@pytest.mark.parametrize("question", [
    "What is the color of the bus? Answer the question using a single word or phrase.",
    "Is there a dog in the image?\nA. yes\nB. no\nAnswer with the option's letter from the given choices directly.",
    "What is it?", "How many red apples are on the table, left of the cup?", "The man's hat"])
def test_keywords_are_the_official_ones(question):
    pruner = get_pruner("mmtok")
    assert pruner.keywords(question, {}) == official_extract_keywords_simple(question)
    assert pruner.keywords(question, {"text": "question"}) == f"Question: {question}"


@pytest.mark.parametrize("broken", ["softmax_over_text_axis", "text_term_dropped"])
def test_a_broken_method_fails_the_comparison(monkeypatch, broken):
    """The comparison can fail: the coverage softmax over the wrong axis, or the text rows dropped."""
    if broken == "softmax_over_text_axis":
        softmax = F.softmax
        monkeypatch.setattr(mm, "F", types.SimpleNamespace(softmax=lambda x, dim: softmax(x, dim=0)))
    else:
        coverage = mm.coverage
        monkeypatch.setattr(mm, "coverage", lambda text, *a: coverage(text, *a)[text.shape[0]:])
    for side, keep in [(24, 64), (8, 16)]:
        text, tokens, tower = fixed_signals(side, 0)
        assert ours(text, tokens, tower, side, keep).keep_idx.tolist() != official_kept(text, tokens, tower, keep)


# ---- through the engine on the tiny models ---------------------------------------------------------

@pytest.fixture(params=["shipped", "random"])
def engine_of(request, engine_for, shipped_engine):
    """family -> the shipped tiny model (``tiny-llava`` / ``tiny-qwen2-vl``) or a randomly initialised one."""
    shipped_name = {"llava": "tiny-llava", "qwen2_vl": "tiny-qwen2-vl"}
    return lambda family: shipped_engine(shipped_name[family]) if request.param == "shipped" else engine_for(family)


def _first_layer_inputs(engine):
    seen = []
    hook = engine.adapter.llm_layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True)
    return seen, hook


def _keyword_embeds(engine, text):
    return official_encode_text_with_token_pooling(text, engine.processor.tokenizer, engine.model.get_input_embeddings())


@pytest.mark.parametrize("keep,prompt", [(16, "what color is the square?"), (32, "<image>\nwhere is the red circle"),
                                         (8, "what shape is on the left? Answer the question using a single word "
                                             "or phrase.")])
def test_engine_matches_official_on_tiny_llava(engine_of, keep, prompt):
    """Kept set = the official one on the projector's output, the feature layer's states (CLS included: the
    official code strips it) and the keyword embeddings, all computed here; the LLM's visual embeddings are the
    kept projected features."""
    engine, img = engine_of("llava"), noise_image(5)
    inputs = engine.prepare(prompt, images=[img])
    model = engine.model.model
    with torch.no_grad():
        states = model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        tower = states[engine.model.config.vision_feature_layer][0]  # [1 + N, C]
        projected = model.multi_modal_projector(tower[None, 1:])[0]  # [N, D]
    question = prompt.replace("<image>\n", "")  # the official code strips the leading "<image>\n"
    text = _keyword_embeds(engine, official_extract_keywords_simple(question))
    want = official_kept(text.float(), projected.float(), tower.float(), keep)
    seen, hook = _first_layer_inputs(engine)
    try:
        res = engine.generate(prompt, images=[img], plan=f"mmtok:keep={keep}", max_new_tokens=1)
    finally:
        hook.remove()
    assert res.kept[0].tolist() == want
    first = int((inputs["input_ids"][0] == engine.model.config.image_token_id).nonzero()[0])
    torch.testing.assert_close(seen[0][0, first:first + keep].float(), projected[want].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep,plan_options,text_of", [
    (16, "", lambda q: official_extract_keywords_simple(q)),
    (24, ",text=question,tv_temperature=0.01", lambda q: f"Question: {q}")])
def test_engine_matches_official_on_tiny_qwen2_vl(engine_of, keep, plan_options, text_of):
    """Qwen2-VL gives no projector input: the documented surrogate covers the projected tokens with themselves
    (the official Qwen2.5-VL wrapper: pre-merger states); the text as the LLaVA path or, with
    ``text=question,tv_temperature=0.01``, as the official Qwen2.5-VL wrapper gives it."""
    engine, img = engine_of("qwen2_vl"), noise_image(6)
    prompt = "what color is the big square?"
    inputs = engine.prepare(prompt, images=[img])
    with torch.no_grad():
        out = engine.model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                    image_grid_thw=inputs["image_grid_thw"])
    projected = torch.cat(list(out.pooler_output if hasattr(out, "pooler_output") else out))
    text = _keyword_embeds(engine, text_of(prompt))
    tv = 0.01 if "tv_temperature" in plan_options else 0.02
    want = official_kept(text.float(), projected.float(), projected.float(), keep, tv=tv)
    seen, hook = _first_layer_inputs(engine)
    try:
        res = engine.generate(prompt, images=[img], plan=f"mmtok:keep={keep}{plan_options}", max_new_tokens=1)
    finally:
        hook.remove()
    assert res.kept[0].tolist() == want
    first = int((inputs["input_ids"][0] == engine.model.config.image_token_id).nonzero()[0])
    torch.testing.assert_close(seen[0][0, first:first + keep].float(), projected[want].float(), atol=1e-5, rtol=1e-5)
    assert math.isfinite(float(res.scores[0].sum()))


def test_without_keywords_only_the_image_is_covered():
    """No keyword embeddings (a frames stage's ``within=mmtok``): the official greedy on alpha Q alone."""
    text, tokens, tower = fixed_signals(8, 5)
    inp = StageInput(tokens=tokens, keep=16, coords=grid_coords(8, 8), patches=tower)
    _, combined = official_mm_coverage_selection(text, tokens, tower, 16)
    want = official_greedy_merged_jit_kernel(combined[text.shape[0]:], 16, torch.empty(0, dtype=torch.long))
    assert get_pruner("mmtok").select(inp).keep_idx.tolist() == want.sort().values.tolist()
