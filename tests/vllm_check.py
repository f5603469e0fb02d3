"""Run in vLLM's environment (.venv-vllm) by tests/test_vllm_plugin.py: ONE vLLM engine on one model, every
check of the spec, results as JSON.

    .venv-vllm/bin/python tests/vllm_check.py spec.json out.json

spec: {"model": dir, "max_model_len": int, "llm_kwargs": {...} (more vllm.LLM arguments, e.g. chunked prefill),
       "calls": [[request, ...], ...], "bad": [plan value, ...],
       "after_bad": request, "stock": bool (no plugin: stock vLLM), "video_calls": [[request, ...], ...],
       "bad_video": [plan, ...] (each on video_calls[0][0], expected refused)}; a
       request is {"prompt": text, "image": png path | "video": .npy path of [T, H, W, 3] uint8 frames,
       "video_fps": float | absent (send the video's metadata: all frames, at that rate), "plan": str | absent,
       "max_tokens": int}. Each call is one ``LLM.generate`` (a batch); the plugin's kept-index log
(TOKENSIEVE_VLLM_KEPT_LOG) is read after each call.
out: {"entry_point", "model_class", "calls": [[{"prompt_len", "token_ids", "text"}, ...], ...],
      "kept": [[{"plan", "n", "kept"}, ...] per call], "video_calls", "video_calls_kept" (the same), "bad": [{"plan", "error", "type"}], "bad_video": [{"plan", "error"}],
      "after_bad": {...}}
"""
import json
import os
import sys
import tempfile


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    log = os.path.join(tempfile.mkdtemp(), "kept.jsonl")
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                       "TOKENSIEVE_VLLM_KEPT_LOG": log})
    if spec.get("stock"):  # stock vLLM: no plugin loaded (VLLM_PLUGINS names the plugins to load: none)
        os.environ["VLLM_PLUGINS"] = ""
    from importlib.metadata import entry_points

    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], max_model_len=spec["max_model_len"], enforce_eager=True, dtype="float32",
              limit_mm_per_prompt={"image": 1, "video": int("video_calls" in spec)}, seed=0,
              **spec.get("llm_kwargs", {}))
    out = {"entry_point": [e.value for e in entry_points(group="vllm.general_plugins") if e.name == "tokensieve"],
           "model_class": llm.apply_model(lambda m: type(m).__module__ + ":" + type(m).__name__)[0],
           "calls": [], "kept": [], "bad": []}

    def request(r):
        extra = {"mm_processor_kwargs": {"plan": r["plan"]}} if "plan" in r else {}
        media = {"video": video(r)} if "video" in r else {"image": Image.open(r["image"]).convert("RGB")}
        return {"prompt": r["prompt"], "multi_modal_data": media, **extra}

    def video(r):
        """The frames, with the metadata families that need it read (frames as given, at ``video_fps``: the
        engine's rate for a frame list), as the engine's ``video_inputs`` passes them."""
        frames = np.load(r["video"])
        if "video_fps" not in r:
            return frames
        n = len(frames)
        return frames, {"fps": r["video_fps"], "duration": n / r["video_fps"], "total_num_frames": n,
                        "frames_indices": list(range(n)), "video_backend": "opencv", "do_sample_frames": False}

    def generate(reqs):
        params = [SamplingParams(max_tokens=r.get("max_tokens", 1), temperature=0) for r in reqs]
        res = llm.generate([request(r) for r in reqs], params, use_tqdm=False)
        return [{"prompt_len": len(o.prompt_token_ids), "token_ids": list(o.outputs[0].token_ids),
                 "text": o.outputs[0].text} for o in res]

    for call in spec["calls"]:
        open(log, "w").close()
        out["calls"].append(generate(call))
        out["kept"].append([json.loads(line) for line in open(log)])
    if "video_calls" in spec:
        out["video_calls"], out["video_calls_kept"] = [], []
        for call in spec["video_calls"]:
            open(log, "w").close()
            out["video_calls"].append(generate(call))
            out["video_calls_kept"].append([json.loads(line) for line in open(log)])
    for bad in spec.get("bad", []):
        try:
            generate([{**spec["after_bad"], "plan": bad}])
            out["bad"].append({"plan": bad, "error": None, "type": None})
        except Exception as e:  # noqa: BLE001 - the test reads the type and message
            out["bad"].append({"plan": bad, "error": str(e), "type": type(e).__name__})
    for bad in spec.get("bad_video", []):  # plans on a video the plugin cannot prune: refused, per request
        try:
            generate([{**spec["video_calls"][0][0], "plan": bad}])
            out.setdefault("bad_video", []).append({"plan": bad, "error": None})
        except Exception as e:  # noqa: BLE001 - the test reads the message
            out.setdefault("bad_video", []).append({"plan": bad, "error": str(e)})
    if "after_bad" in spec:
        out["after_bad"] = generate([spec["after_bad"]])[0]
    json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
