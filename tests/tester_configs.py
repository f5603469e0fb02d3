"""transformers' own tester configurations of the families, as data, and tiny models built from them.

Each ``TESTER[family]`` is the configuration that the family's ``*VisionText2TextModelTester`` in
transformers' repository builds (``get_config``; the file and the commit read are cited in ``source``),
with the tester's test-input fields (``seq_length``, ``is_training``, ``use_labels``, ``num_labels``, ...)
left out since they are not configuration. ``CHANGES[family]`` lists the only values changed, each with
why: the word-level test tokenizer's vocabulary size and token ids (``tokensieve.testing.tokenizer_for``),
and the v4 name ``rope_scaling`` written as transformers 5's ``rope_parameters``. ``PROCESSOR[family]``:
settings of the family processor (``family_module(family).processor(config, tok, **settings)``), which
the testers do not have (they feed random pixel tensors): the Qwen testers' 28 px image is one merged
token, so images are resized to between the stated pixel counts instead.

The files read are the versions the code index holds (commits cited), written before transformers' testers
moved to ``tests/vlm_tester.py``'s ``VLMModelTester``: the Qwen testers pass their text fields at the top level
of the config, here under ``text_config`` (where transformers 5 reads them); OneVision's tester gives no vision
``model_type`` (the config's default, SigLIP, as here). Depth is the testers' own (LLM 2 / 2 / 2 / 3 / 4 / 2 / 4 / 3 / 2 / 2 layers,
towers 2 layers; LLaVA-OneVision-1.5's is its conversion test's, the modeling tester read being full size): the invariant tests use plans whose layers exist at that depth.

    path = write_tester_model("qwen2_vl", "/tmp/tester-qwen2_vl")   # seeded, like tokensieve.testing.make_tiny
"""
import copy

import torch
from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, InternVLConfig, InternVLForConditionalGeneration,
                          LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                          SmolVLMConfig, SmolVLMForConditionalGeneration)
from transformers import Glm4vConfig, Glm4vForConditionalGeneration
from transformers import LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration

from tokensieve.engine.adapters import family_module
from tokensieve.testing import tokenizer_for

_TF = "huggingface/transformers"
_CLIP_VISION = dict(num_channels=3, hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=37, dropout=0.1, attention_dropout=0.1, initializer_range=0.02)
_LLAMA_TEXT = dict(model_type="llama", vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=37, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                   type_vocab_size=16, initializer_range=0.02)

TESTER = {
    "llava": dict(
        source=(_TF, "tests/models/llava/test_modeling_llava.py", "00ff1ed1f74af4c96b38cc54dde576e38a7bfb8c",
                "LlavaVisionText2TextModelTester"),
        config=dict(text_config=dict(_LLAMA_TEXT, max_position_embeddings=512, pad_token_id=1),
                    vision_config=dict(_CLIP_VISION, image_size=8, patch_size=2),
                    ignore_index=-100, image_token_index=0, projector_hidden_act="gelu",
                    vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=16)),
    "llava_next": dict(
        source=(_TF, "tests/models/llava_next/test_modeling_llava_next.py", "028e50262806e30e9c1c4517cbac3e1f9208e190",
                "LlavaNextVisionText2TextModelTester"),
        config=dict(text_config=dict(_LLAMA_TEXT, max_position_embeddings=580, pad_token_id=0),
                    vision_config=dict(_CLIP_VISION, image_size=16, patch_size=2),
                    ignore_index=-100, image_token_index=0, projector_hidden_act="gelu",
                    vision_feature_select_strategy="default", vision_feature_layer=-1,
                    image_grid_pinpoints=[[32, 32]])),
    "llava_onevision": dict(
        source=(_TF, "tests/models/llava_onevision/test_modeling_llava_onevision.py",
                "032b32abfb07ba36e8fc1a8e5251514523edce34", "LlavaOnevisionVisionText2TextModelTester"),
        config=dict(text_config=dict(_LLAMA_TEXT, model_type="qwen2", num_key_value_heads=4,
                                     max_position_embeddings=580, pad_token_id=0),
                    vision_config=dict(_CLIP_VISION, image_size=16, patch_size=8),
                    ignore_index=-100, image_token_index=1, projector_hidden_act="gelu",
                    vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=[[16, 16]])),
    "qwen2_vl": dict(
        source=(_TF, "tests/models/qwen2_vl/test_modeling_qwen2_vl.py", "0000ee06b439c1a0d0f0ad7ae9d0c58b739c184a",
                "Qwen2VLVisionText2TextModelTester"),
        config=dict(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, hidden_act="silu", max_position_embeddings=512,
                                     max_window_layers=3, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
                                     vocab_size=152064,
                                     rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, rope_theta=10000),
                    vision_config=dict(depth=2, embed_dim=32, hidden_act="quick_gelu", hidden_size=32, mlp_ratio=4,
                                       num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                    tie_word_embeddings=True, vision_start_token_id=151652, image_token_id=151655,
                    video_token_id=151656)),
    "qwen2_5_vl": dict(
        source=(_TF, "tests/models/qwen2_5_vl/test_modeling_qwen2_5_vl.py", "0112a17f35015f0f17f799c2cfb2a4f4ced01593",
                "Qwen2_5_VLVisionText2TextModelTester"),
        config=dict(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
                                     num_key_value_heads=2, hidden_act="silu", max_position_embeddings=512,
                                     max_window_layers=3, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
                                     pad_token_id=2, vocab_size=99,
                                     rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, rope_theta=10000),
                    vision_config=dict(depth=2, in_chans=3, hidden_act="silu", intermediate_size=32, out_hidden_size=32,
                                       hidden_size=32, num_heads=4, patch_size=14, spatial_patch_size=14,
                                       spatial_merge_size=1, temporal_patch_size=2),
                    tie_word_embeddings=True, vision_start_token_id=3, image_token_id=4, video_token_id=5)),
    "gemma3": dict(
        source=(_TF, "tests/models/gemma3/test_modeling_gemma3.py", "003320480b9eac976d31b6d4e0f02e80249a3826",
                "Gemma3Vision2TextModelTester"),  # its text config: Gemma3ModelTester (GemmaModelTester's, i.e.
        # tests/causal_lm_tester.py CausalLMModelTester.__init__ defaults, commit 2b6c089d5a0b18d59a08c36b91404ece60915cf3)
        config=dict(text_config=dict(model_type="gemma3_text", vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, head_dim=16, intermediate_size=37,
                                     max_position_embeddings=512, initializer_range=0.02, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
                    vision_config=dict(model_type="siglip_vision_model", image_size=20, patch_size=5, num_channels=3,
                                       hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                       dropout=0.1, attention_dropout=0.1, initializer_range=0.02),
                    mm_tokens_per_image=2, image_token_index=4, boi_token_index=5, eoi_token_index=6)),
    "internvl": dict(
        source=(_TF, "tests/models/internvl/test_modeling_internvl.py", "00dcc6dda6f6d8e69541a6b51f97986a80242367",
                "InternVLVisionText2TextModelTester"),
        config=dict(text_config=dict(model_type="qwen2", vocab_size=99, hidden_size=128, intermediate_size=37,
                                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                     output_channels=64, hidden_act="silu", max_position_embeddings=512,
                                     rope_theta=10000, mlp_ratio=4, tie_word_embeddings=True, bos_token_id=0,
                                     eos_token_id=0, pad_token_id=0),
                    vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, image_size=64, patch_size=4, num_channels=3,
                                       hidden_act="quick_gelu",
                                       use_absolute_position_embeddings=True),
                    model_type="internvl", bos_token_id=0, eos_token_id=0, pad_token_id=0, image_token_id=1,
                    image_seq_length=64, vision_feature_layer=-1)),
    "smolvlm": dict(  # 16 px crops of 4 x 4 patches, pixel shuffle 2: 4 tokens per crop
        source=(_TF, "tests/models/smolvlm/test_modeling_smolvlm.py", "ab8523c59c8e0875c85a0ce604f58e1692bbc607",
                "SmolVLMVisionText2TextModelTester"),
        config=dict(text_config=dict(vocab_size=100, hidden_size=64, intermediate_size=56, num_hidden_layers=3,
                                     num_attention_heads=2, num_key_value_heads=2, hidden_act="silu",
                                     max_position_embeddings=256, initializer_range=0.02, rms_norm_eps=1e-6,
                                     pad_token_id=2, bos_token_id=0, eos_token_id=1, image_token_id=57,
                                     tie_word_embeddings=False, rope_theta=10000.0, sliding_window=32,
                                     attention_dropout=0.0),
                    vision_config=dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=32, dropout=0.1, attention_dropout=0.1,
                                       initializer_range=0.02),
                    use_cache=False, image_token_id=57, tie_word_embeddings=False, vocab_size=100, scale_factor=2)),
    "glm4v": dict(  # RoPE on the whole head here (partial_rotary_factor's default 1.0; make_tiny's model: half)
        source=(_TF, "tests/models/glm4v/test_modeling_glm4v.py", "be0b8861ae1cb4be6206193b2d69f80d8797e98f",
                "Glm4vVisionText2TextModelTester"),
        config=dict(text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=22, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, output_channels=64,
                                     hidden_act="silu", max_position_embeddings=512,
                                     rope_scaling={"type": "default", "mrope_section": [2, 1, 1]}, rope_theta=10000,
                                     tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0),
                    vision_config=dict(depth=2, hidden_act="silu", hidden_size=48, out_hidden_size=16,
                                       intermediate_size=22, patch_size=14, spatial_merge_size=1, temporal_patch_size=2),
                    image_token_id=7, video_token_id=8, video_start_token_id=3, video_end_token_id=4,
                    image_start_token_id=5, image_end_token_id=6)),
    "llava_onevision1_5": dict(  # the folder's tiny configuration: its conversion test's ``original_config``, since
        # the modeling tester read (test_modeling_llava_onevision1_5.py, commit 2e6378dcc233fcd21a223a92ba6a529262247473,
        # LlavaOnevisionVision1_5Text2TextModelTester) builds the published checkpoint's size: a 36-layer, 4096-wide
        # Qwen3 and a 24-block, 1024-wide tower (about 8B parameters), which no CPU test can run
        source=(_TF, "tests/models/llava_onevision1_5/test_conversion_llava_onevision1_5.py",
                "944af6dfc02e58c10f4f61a52818706fac4c5c4c", "LlavaOnevision1_5ConversionTest"),
        config=dict(text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_act="silu",
                                     max_position_embeddings=128, initializer_range=0.02, rms_norm_eps=1e-6,
                                     use_cache=True, rope_theta=10000.0, attention_bias=False, attention_dropout=0.0,
                                     use_sliding_window=False, sliding_window=None, max_window_layers=2,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2),
                    vision_config=dict(depth=2, hidden_size=32, hidden_act="gelu", intermediate_size=64, num_heads=4,
                                       in_channels=3, patch_size=4, spatial_merge_size=2, temporal_patch_size=1,
                                       text_hidden_size=32, layer_norm_eps=1e-5, initializer_range=0.02),
                    image_token_id=98, video_token_id=97)),
}

CONFIG_CLASSES = {"llava": (LlavaConfig, LlavaForConditionalGeneration),
                  "llava_next": (LlavaNextConfig, LlavaNextForConditionalGeneration),
                  "llava_onevision": (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration),
                  "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
                  "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
                  "gemma3": (Gemma3Config, Gemma3ForConditionalGeneration),
                  "internvl": (InternVLConfig, InternVLForConditionalGeneration),
                  "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration),
                  "glm4v": (Glm4vConfig, Glm4vForConditionalGeneration),
                  "llava_onevision1_5": (LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration)}

# the only changes, per family (applied by ``tester_config``); each line says why
CHANGES = {
    family: [
        "text vocab_size -> len(tok): the test tokenizer's vocabulary (the tester's ids 0..98 / 152064 are not words)",
        "text pad/bos/eos_token_id -> the test tokenizer's <pad>/<s>/</s>: padding and stopping use its tokens",
        "placeholder ids (image/video/vision_start/vision_end) -> the test tokenizer's (PLACEHOLDERS of the family)",
    ] + (["top-level vocab_size 100 and text image_token_id 57 left as given: the model reads text_config's "
          "vocab_size and the top-level image_token_id (the test tokenizer's <image>); SmolVLM's crop markers "
          "<fake_token_around_image> / <global-img> added as config fields of the test tokenizer's ids (PLACEHOLDERS)",
          "text sliding_window 32 dropped: Llama's attention has no sliding window (its uncached forward attends to "
          "every position), but transformers 5's DynamicCache(config) reads the field and keeps only the last 31 "
          "keys, so cached and uncached generation (the tester's use_cache=False) differ past 32 tokens"]
         if family == "smolvlm" else []) + (["tie_word_embeddings True -> False: re-drawing the output embeddings N(0, 0.5) (as make_tiny does) would "
          "re-draw the input ones too, and greedy decoding then repeats one token",
          "rope_scaling {'type': 'mrope', ...} -> rope_parameters {'rope_type': 'default', ...}: transformers 5's name"]
         if family.startswith("qwen") else [])
    + (["mm_tokens_per_image 2 -> 4: the projector pools the 4 x 4 patch grid to int(sqrt(2))^2 = 1 token per image "
        "(the tester feeds one image token), too few for any plan to prune; 4 = a 2 x 2 pool, kernel 2",
        "tie_word_embeddings True -> False (the top level; the tester's text config has False): as for the Qwen "
        "testers, re-drawing the output embeddings would re-draw the input ones",
        "the tester's vision fields use_labels / is_training / num_key_value_heads left out: test inputs, not SigLIP "
        "configuration; boi/eoi_token_index (v4 names) set from PLACEHOLDERS like image_token_index"]
       if family == "gemma3" else [])
    for family in TESTER
}
CHANGES["internvl"] += [
    "top-level pad/bos/eos_token_id -> the test tokenizer's, as the text config's",
    "tie_word_embeddings True -> False (text and top level): as the Qwen testers' (make_tiny's re-drawn output "
    "embeddings)",
    "text rope_theta 10000 -> rope_parameters {'rope_type': 'default', 'rope_theta': 10000.0}: transformers 5's name",
]
CHANGES["glm4v"] += [
    "tie_word_embeddings True -> False (text and top level): as the Qwen testers' (make_tiny's re-drawn output "
    "embeddings)",
    "rope_scaling {'type': 'default', ...} -> rope_parameters {'rope_type': 'default', ...}: transformers 5's name",
    "placeholder ids also image/video start and end (<|begin_of_image|> ...): GLM-4V's PLACEHOLDERS",
]
CHANGES["llava_onevision1_5"] += [
    "text rope_theta 10000.0 -> rope_parameters {'rope_type': 'default', 'rope_theta': 10000.0}: transformers 5's name",
    "text max_position_embeddings 128 -> 512: the engine refuses a prompt past the model's positions, and the video "
    "tests' 4-frame clips take 140 visual tokens (35 a frame); 1-D default RoPE computes any position alike",
    "placeholder ids also vision_start/vision_end (the config's defaults 151652 / 151653 are past the test "
    "vocabulary): the family's PLACEHOLDERS (Qwen's)",
]
PROCESSOR = {  # processor settings (not tester configuration): why, per family
    "llava": {},  # the tower's 8 px image, patch 2: 16 tokens (the tester's image_seq_length)
    "llava_next": {},  # 16 px tiles, patch 2, the model's one tiling 32 x 32
    "llava_onevision": {},  # 16 px tiles, patch 8, the model's one tiling 16 x 16
    "qwen2_vl": {"pixels": (112 * 112, 28 * 28 * 64)},  # the tester's 28 px image is 1 token: 16 to 64 merged tokens
    "qwen2_5_vl": {"pixels": (56 * 56, 14 * 14 * 64)},  # merge 1, patch 14: 16 to 64 tokens per image
    "gemma3": {},  # the tower's 20 px square image, 4 tokens (pan-and-scan: tests/test_gemma3.py)
    "internvl": {"max_patches": 4},  # 64 px tiles, 64 tokens each: 1, or 2-4 + a thumbnail (in 512 positions)
    "smolvlm": {},  # 16 px crops (the tower's image size), images split into up to 2 x 2 crops + the global one
    "glm4v": {"pixels": (56 * 56, 14 * 14 * 64)},  # merge 1, patch 14: 16 to 64 tokens per image (as Qwen2.5-VL's)
    "llava_onevision1_5": {"pixels": (32 * 32, 64 * 64)},  # patch 4, merge 2 (8 px a token): 16 to 64 tokens per image
}


def tester_config(family: str, tok):
    """The tester's configuration of ``family`` with ``CHANGES[family]`` applied for the test tokenizer ``tok``."""
    fields = copy.deepcopy(TESTER[family]["config"])
    text = fields["text_config"]
    text.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    if "rope_scaling" in text:
        text["tie_word_embeddings"] = fields["tie_word_embeddings"] = False
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(text.pop("rope_theta")),
                                   "mrope_section": text.pop("rope_scaling")["mrope_section"]}
    for v4_name in ("image_token_index", "boi_token_index", "eoi_token_index"):  # v4 names of PLACEHOLDERS' fields
        fields.pop(v4_name, None)
    if family == "gemma3":
        fields.update(mm_tokens_per_image=4, tie_word_embeddings=False)
    if family == "llava_onevision1_5":  # CHANGES["llava_onevision1_5"]'s own lines
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(text.pop("rope_theta"))}
        text["max_position_embeddings"] = 512
    if family == "internvl":  # CHANGES["internvl"]'s own lines
        fields.update(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        text["tie_word_embeddings"] = fields["tie_word_embeddings"] = False
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(text.pop("rope_theta"))}
    if family == "smolvlm":  # CHANGES: Llama attends to every position; a sliding_window makes the cache drop some
        text.pop("sliding_window")
    for field, token in family_module(family).PLACEHOLDERS.items():
        fields[field] = tok.convert_tokens_to_ids(token)
    return CONFIG_CLASSES[family][0](**fields)


def write_tester_model(family: str, path, seed: int = 0) -> str:
    """Write ``family``'s tester model (seeded random weights, output embeddings N(0, 0.5) as in ``make_tiny``, so
    greedy decoding is not all ties) with its processor to ``path``; return the path."""
    torch.manual_seed(seed)
    tok = tokenizer_for(family)
    config = tester_config(family, tok)
    model = CONFIG_CLASSES[family][1](config)
    processor = family_module(family).processor(config, tok, **PROCESSOR[family])
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.5)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = config.get_text_config().eos_token_id
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)
